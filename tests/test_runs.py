"""Attribution runs through train.py's config path: export, resume, safe names, TensorBoard, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m2ib_lightning import attribute
from m2ib_lightning.config import ConfigError, load_config
from m2ib_lightning.data.attribution import sample_seed
from m2ib_lightning.backbones import load_backbone
from m2ib_lightning import read_attributions
from m2ib_lightning.results import OutputMismatch, done_ids, index_entries, safe_name
from m2ib_lightning.tasks.attribute import run


def _config(tmp_path: Path, bundle: Path, *overrides: str):
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}", f"model.name_or_path={bundle}", "data.num_samples=6",
            "data.batch_size=4", "m2ib.vision_layer=0", "m2ib.text_layer=0", "m2ib.steps=3", "m2ib.num_noise=2",
            "trainer.enable_progress_bar=false", *overrides,
        ],
    )


def test_run_exports_maps_that_read_back_equal_to_the_engine(tmp_path, tiny_bundle):
    summary = run(_config(tmp_path, tiny_bundle))
    out = tmp_path / "run"
    assert summary["done"] == 6 and summary["skipped"] == 0 and summary["total_in_output"] == 6
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["localisation"]) == {"m2ib", "random"}
    assert saved["config"]["m2ib"]["steps"] == 3
    assert (out / "config.yaml").exists()
    assert len(list((out / "overlays" / "rank0").glob("*.png"))) == 6

    records = list(read_attributions(out))
    assert len(records) == 6 and len({r.id for r in records}) == 6
    backbone = load_backbone(str(tiny_bundle))
    model, processor = backbone.module, backbone.processor
    first = records[0]
    from m2ib_lightning.shapes.world import ShapesWorld

    sample = ShapesWorld(seed=1).sample(int(first.id.rsplit("-", 1)[1]))
    inputs = processor(images=sample.image, text=sample.text, return_tensors="pt")
    direct = attribute(
        model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], vision_layer=0, text_layer=0,
        steps=3, num_noise=2, seed=sample_seed(0, first.id),
    )
    torch.testing.assert_close(first.image_map, direct.image_maps[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(first.text_map, direct.text_maps[0], atol=1e-5, rtol=0)
    assert first.tokens == processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])


def test_rerun_skips_done_ids_and_adds_the_rest_once(tmp_path, tiny_bundle):
    run(_config(tmp_path, tiny_bundle, "data.num_samples=4"))
    before = {r.id: r.image_map for r in read_attributions(tmp_path / "run")}
    summary = run(_config(tmp_path, tiny_bundle, "data.num_samples=7"))
    assert summary["done"] == 3 and summary["skipped"] == 4
    ids = [entry["id"] for entry in index_entries(tmp_path / "run")]
    assert len(ids) == len(set(ids)) == 7
    after = {r.id: r.image_map for r in read_attributions(tmp_path / "run")}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rerun_with_other_settings_is_refused(tmp_path, tiny_bundle):
    run(_config(tmp_path, tiny_bundle, "data.num_samples=2"))
    with pytest.raises(OutputMismatch, match=r"holds a run with other `m2ib` settings: m2ib.beta=0.1 \(asked: 0.5\);"):
        run(_config(tmp_path, tiny_bundle, "data.num_samples=2", "m2ib.beta=0.5"))


def test_partial_index_line_from_a_killed_run_is_ignored_and_cut(tmp_path, tiny_bundle):
    run(_config(tmp_path, tiny_bundle, "data.num_samples=4"))
    index = tmp_path / "run" / "index-rank0.jsonl"
    with open(index, "a") as handle:
        handle.write('{"id": "shapes-1-9", "text": "half a li')
    assert len(done_ids(tmp_path / "run")) == 4
    run(_config(tmp_path, tiny_bundle, "data.num_samples=5"))
    assert [e["id"] for e in index_entries(tmp_path / "run")].count("shapes-1-4") == 1
    assert index.read_text().endswith("\n") and len(index.read_text().splitlines()) == 5


@pytest.mark.parametrize("sample_id", ["../../escape", "a/b", "/etc/passwd", "..", "", "x" * 500, "a\\b:c"])
def test_safe_names_stay_inside_the_directory(tmp_path, sample_id):
    name = safe_name(sample_id)
    target = (tmp_path / f"{name}.png").resolve()
    assert target.parent == tmp_path.resolve()
    assert not name.startswith(".") and "/" not in name and "\\" not in name and len(name) < 100
    assert safe_name(sample_id) != safe_name(sample_id + "_")


def _events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_holds_curves_images_text_maps_and_hparams_with_final_metrics(tmp_path, tiny_bundle):
    run(_config(tmp_path, tiny_bundle, "export.tensorboard_every_n_batches=1"))
    events = _events(tmp_path / "run")
    tags = events.Tags()
    assert {"fit/image/fit", "fit/text/capacity", "final/image/fit", "throughput/rank0_samples_per_s",
            "summary/samples_per_s", "localisation/m2ib_pointing_game"} <= set(tags["scalars"])
    assert len(events.Scalars("fit/image/fit")) == 2 * 3  # two batches of three fit steps
    assert "maps" in tags["images"] and len(events.Images("maps")) == 2
    assert "text_maps/text_summary" in tags["tensors"]
    text = events.Tensors("text_maps/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "shapes-1-0" in text and "`" in text
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    assert b"summary/samples_per_s" in hparams["_hparams_/experiment"]  # hparams carry the final metrics, not -1


def test_tensorboard_steps_continue_after_a_resume(tmp_path, tiny_bundle):
    run(_config(tmp_path, tiny_bundle, "data.num_samples=4"))
    run(_config(tmp_path, tiny_bundle, "data.num_samples=7"))
    steps = [e.step for e in _events(tmp_path / "run").Scalars("final/image/fit")]
    assert steps == [4, 7]  # samples in the output after each batch: the second run goes on from 4
    fit_steps = [e.step for e in _events(tmp_path / "run").Scalars("fit/image/fit")]
    assert fit_steps == sorted(fit_steps) and fit_steps[3] >= 4


def test_tensorboard_and_the_summary_report_percent_done_and_the_eta(tmp_path, tiny_bundle):
    summary = run(_config(tmp_path, tiny_bundle, "data.num_samples=6", "data.batch_size=2"))
    assert summary["samples_left_at_start"] == 6 and summary["percent_done"] == 100.0
    events = _events(tmp_path / "run")
    percent = [(e.step, e.value) for e in events.Scalars("progress/percent_done")]
    assert percent == [(2, pytest.approx(100 / 3)), (4, pytest.approx(200 / 3)), (6, 100.0)]
    eta = [e.value for e in events.Scalars("progress/eta_s")]
    assert len(eta) == 3 and eta[-1] == 0.0 and eta[0] > 0


def test_progress_counts_the_other_ranks_index_lines_as_they_commit_never_more(tmp_path):
    from types import SimpleNamespace

    from m2ib_lightning.callbacks import RunProgress
    from m2ib_lightning.results import index_path

    index_path(tmp_path, 1).write_text('{"id": "old"}\n')  # an earlier run's line: not this run's progress
    progress = RunProgress(tmp_path, left=lambda: 10)
    progress.on_predict_start(SimpleNamespace(world_size=2, global_rank=0), None)
    progress.on_predict_batch_end(None, None, {"id": ["a", "b"], "failures": [{"severity": "error"}]}, None, 0)
    assert progress.done() == 3  # its own two samples and one failed record
    with open(index_path(tmp_path, 1), "a") as handle:
        handle.write('{"id": "r1-0"}\n{"id": "r1-1"}\n{"id": "r1-')  # rank 1 commits two, a third is half written
    assert progress.done() == 5 and progress.percent_done() == 50.0
    with open(index_path(tmp_path, 1), "a") as handle:
        handle.write('2"}\n')
    index_path(tmp_path, 0).write_text('{"id": "a"}\n{"id": "b"}\n')  # its own lines are counted by itself
    assert progress.done() == 6 and progress.eta_s() > 0


@pytest.mark.parametrize(
    "override,match",
    [
        ("m2ib.vision_layr=1", r"bad config key 'm2ib.vision_layr' in the command line"),
        ("data.batch_size=eight", r"bad config key 'data.batch_size'"),
        ("nonsense=1", r"bad config key 'nonsense'"),
        ("task=dance", r"task='dance' is unknown"),
        ("m2ib.steps=0", r"bad config value in m2ib: steps must be >= 1"),
        ("trainer.devicez=2", r"bad config key 'trainer.devicez': lightning.Trainer takes no argument"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_train_py_reports_a_bad_key_before_any_work(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "train.py", f"output_dir={tmp_path / 'never'}", "m2ib.bta=0.2"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "m2ib.bta" in proc.stderr
    assert not (tmp_path / "never").exists()
