"""A run's results as Parquet: one row per sample, streamed shard by shard, and the README's pandas lines run."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import ROOT
from m2ib_lightning.export import main, to_parquet
from m2ib_lightning.results import read_attributions
from test_scale import _config


def test_an_attribution_run_as_parquet_with_its_maps_and_the_readme_example(tmp_path, tiny_bundle, monkeypatch):
    import pandas as pd

    from m2ib_lightning.tasks.attribute import run

    out = tmp_path / "run"
    run(_config(out, tiny_bundle, "data.num_samples=5", "export.samples_per_shard=2"))  # 3 shards
    assert main([str(out), str(tmp_path / "results.parquet"), "--maps"]) == 0
    table = pd.read_parquet(tmp_path / "results.parquet")
    records = {r.id: r for r in read_attributions(out)}
    assert list(table["id"]) == list(records) and table["shard"].nunique() == 3
    assert set(table["class"]) <= {"circle", "square", "triangle", "diamond", "cross"}  # the world's referred shape
    for _, row in table.iterrows():
        record = records[row["id"]]
        assert list(row["tokens"]) == record.tokens and row["image_fit"] == pytest.approx(record.image_fit)
        grid = torch.tensor(list(row["image_map"])).view(*row["patch_grid"])
        torch.testing.assert_close(grid, (record.image_capacity - record.image_capacity.min())
                                   / (record.image_capacity.max() - record.image_capacity.min()), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(list(row["text_map"])), record.text_map, atol=1e-6, rtol=0)

    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\nimport pandas as pd\n(.*?)```", readme, re.S).group(0).strip("`").removeprefix("python\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README example", "exec"), {})  # the README's lines, on this run's file


def test_a_directory_without_a_run_is_refused_by_name(tmp_path, capsys):
    from m2ib_lightning.results import IDENTITY_FILE, read_attributions

    with pytest.raises(FileNotFoundError, match="holds no run"):  # not a bare StopIteration from an empty stream
        next(read_attributions(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), str(tmp_path / "x.parquet")])
    assert exit_info.value.code == 2 and "holds no run" in capsys.readouterr().err
    (tmp_path / IDENTITY_FILE).write_text("{}")  # a run that has written nothing yet
    with pytest.raises(ValueError, match="holds no indexed sample"):
        to_parquet(tmp_path, tmp_path / "x.parquet")
    assert list(read_attributions(tmp_path)) == []


def test_the_readme_runs_a_method_from_python():
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\nimport torch\nfrom m2ib_lightning.backbones import load_backbone\n"
                        r"from m2ib_lightning.baselines import make_method\n(.*?)```", readme, re.S).group(0)
    code = example.strip("`").removeprefix("python\n")
    scope: dict = {}
    exec(compile(code, "README example", "exec"), scope)
    maps = scope["maps"]
    assert maps.image.shape == (1, 64, 64) and maps.text.shape == scope["ids"].shape
    assert float(maps.image.max()) == 1.0 and float(maps.text.max()) == 1.0
