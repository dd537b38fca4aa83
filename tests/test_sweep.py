"""The sweep task on a tiny model: killed and resumed, every cell equals a plain evaluation run with its setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_edges_runs import _main

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SMALL = ("data.num_samples=6", "data.batch_size=3", "m2ib.steps=2", "m2ib.num_noise=2", "metrics.steps=4",
         "trainer.enable_progress_bar=false")


def _args(config: str, out, bundle, *extra: str) -> list[str]:
    return [sys.executable, "train.py", config, f"output_dir={out}", f"model.name_or_path={bundle}", *SMALL, *extra]


def test_a_sweep_killed_and_resumed_has_the_cells_of_plain_runs_and_names_the_best(tmp_path, tiny_bundle, capsys):
    grid = ("sweep.vision_layer=[0]", "sweep.text_layer=[0,1]", "sweep.beta=[0.1,1.0]")
    sweep = _args("configs/sweep_shapes.yaml", tmp_path / "sweep", tiny_bundle, *grid)
    proc = subprocess.Popen(sweep, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = tmp_path / "sweep" / "cells" / "vision0-text0-beta0.1" / "summary.json"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not first.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "sweep" / "sweep.json").exists()
    done = _main(capsys, *sweep[2:])  # resumed in this process: no interpreter start-up
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert list(result["cells"]) == ["vision0-text0-beta0.1", "vision0-text0-beta1", "vision0-text1-beta0.1", "vision0-text1-beta1"]
    plain = _main(capsys, *_args("configs/evaluate_shapes.yaml", tmp_path / "plain", tiny_bundle, "methods=[m2ib]",
                                 "m2ib.vision_layer=0", "m2ib.text_layer=1", "m2ib.beta=1.0")[2:])
    assert plain.returncode == 0, plain.stderr
    expected = json.loads((tmp_path / "plain" / "summary.json").read_text())["methods"]["m2ib"]
    cell = result["cells"]["vision0-text1-beta1"]
    for metric, value in expected.items():
        if metric != "samples_per_s":
            assert cell[metric] == (pytest.approx(value, abs=1e-6) if value is not None else None), metric
    # the image map does not depend on the text layer: the image columns of text 0 and text 1 agree
    assert result["cells"]["vision0-text0-beta1"]["pointing_game"] == pytest.approx(cell["pointing_game"], abs=1e-6)
    for metric, name in result["best"].items():
        values = [c[metric][0] for c in result["cells"].values() if c[metric] is not None]
        assert result["cells"][name][metric][0] in (max(values), min(values))
    assert set(result["beats_random"]) >= {"pointing_game", "text_deletion_auc"}
    assert "**" in (tmp_path / "sweep" / "results.md").read_text()
    assert {p.name for p in (tmp_path / "sweep" / "figures").iterdir()} == {"sweep_image.png", "sweep_text.png"}
