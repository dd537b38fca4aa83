"""The VQA probing run through train.py: its outputs, 1 process = 2 processes, and settings that may not mix."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, train_main

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _arguments(out: Path, bundle: Path, *extra: str) -> list[str]:
    return ["configs/probe_shapes_vqa.yaml", f"output_dir={out}", f"model.name_or_path={bundle}", "data.num_pairs=4",
            "probe.sites=[resid,cross_attn,cross_head]", "probe.top_heads=2", "trainer.enable_progress_bar=false", *extra]


def _probe(out: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *_arguments(out, bundle, *extra)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=ENV)


def _probe_here(capsys, out: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    """The run in this process (no interpreter start-up), on one intra-op thread as the subprocesses."""
    from test_edges_runs import _main

    return _main(capsys, *_arguments(out, bundle, *extra), "threads=1")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_vqa_bundle) -> Path:
    out = tmp_path_factory.mktemp("probe") / "one"
    assert train_main(*_arguments(out, tiny_vqa_bundle, "threads=1")) == 0
    return out


def test_probe_run_writes_arrays_rankings_figures_and_summary(one_process):
    out = one_process
    effects = load_file(out / "effects.safetensors")
    assert effects["image/text/resid/raw"].shape[:2] == (4, 2)  # 4 pairs, 2 text-encoder layers
    assert effects["image/text/cross_head/mean"].shape == (2, 4)  # layers x heads
    assert effects["image/vision/resid/mean"].shape == (2, 1)  # vision tower, all image tokens at once
    assert "image/text/resid/colour/mean_by_role" in effects
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 4 and set(summary["accuracy_on_clean_pairs"]) == {"colour", "shape", "size", "side"}
    assert set(summary["universal_heads"]) == {"text/cross_head"}
    rows = list(csv.DictReader((out / "heads.csv").open()))
    assert {r["site"] for r in rows} == {"cross_head"} and len(rows) == 2 * 8  # 2 corruptions x 8 heads, all ranked
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"image_text_cross_head.png", "image_text_resid_colour.png", "image_vision_resid.png"} <= figures
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    # the size options have no other word of their role: text corruption of size questions is skipped, and said why
    assert any(f.get("corruption") == "text" and "no candidate" in f["reason"] for f in summary["failed"])


def test_two_processes_give_the_arrays_of_one(one_process, tmp_path, tiny_vqa_bundle):
    proc = _probe(tmp_path / "two", tiny_vqa_bundle, "trainer.strategy=ddp", "trainer.devices=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_file(one_process / "effects.safetensors"), load_file(tmp_path / "two" / "effects.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].nan_to_num(7.0).equal(two[key].nan_to_num(7.0)), key


def test_rerun_with_other_settings_is_refused(one_process, tiny_vqa_bundle, capsys):
    proc = _probe_here(capsys, one_process, tiny_vqa_bundle, "probe.direction=noise")
    assert proc.returncode == 2 and "holds a run with other `probe` settings" in proc.stderr


def test_a_manifest_of_pairs_with_a_missing_image_lists_it_and_goes_on(tmp_path, tiny_vqa_bundle, capsys):
    from m2ib_lightning.shapes.world import ShapesWorld

    world = ShapesWorld(seed=3)
    rows = []
    for i in range(3):
        world.sample(i).image.save(tmp_path / f"clean{i}.png")
        world.sample(i + 10).image.save(tmp_path / f"corrupt{i}.png")
        rows.append({"id": f"p{i}", "clean_image": f"clean{i}.png", "corrupt_image": f"corrupt{i}.png",
                     "question": "is the circle red or blue?", "answer": "red", "wrong_answer": "blue", "kind": "colour"})
    rows[1]["corrupt_image"] = "gone.png"
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    proc = _probe_here(capsys, out, tiny_vqa_bundle, f"data.manifest={tmp_path / 'pairs.jsonl'}", "data.corruption=[image]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 2
    assert [f["id"] for f in summary["failed"]] == ["p1"] and "image not found" in summary["failed"][0]["reason"]
    assert load_file(out / "effects.safetensors")["image/text/resid/raw"].shape[0] == 2


def test_a_rerun_probes_only_the_pairs_without_a_record_and_gives_the_same_arrays(one_process, tmp_path, tiny_vqa_bundle,
                                                                                  capsys):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(one_process, out)
    parts = sorted((out / "parts").glob("*.pt"))
    assert len(parts) == 4  # one record per pair
    parts[1].unlink()  # as if the run had been killed before that pair
    proc = _probe_here(capsys, out, tiny_vqa_bundle)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probed_now"] == 1 and summary["probed_before"] == 3
    one, resumed = load_file(one_process / "effects.safetensors"), load_file(out / "effects.safetensors")
    assert one.keys() == resumed.keys()
    for key in one:
        torch.testing.assert_close(one[key], resumed[key], rtol=0, atol=0, equal_nan=True)
    proc = _probe_here(capsys, out, tiny_vqa_bundle)  # nothing left to probe
    assert proc.returncode == 0 and json.loads((out / "summary.json").read_text())["probed_now"] == 0


def test_a_decoder_probe_killed_and_resumed_and_on_two_processes_gives_the_arrays_of_one(tmp_path, capsys):
    """The LLaVA probe (prefix-cached cells, image-token groups) through train.py: SIGKILL once its first pair is
    recorded, then resumed, equals 2 uninterrupted DDP processes."""
    import signal
    import time

    from test_edges_runs import _main
    from test_vqa_runs import SIZE, _save_llava

    checkpoint = _save_llava(tmp_path / "llava")

    def args(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "train.py", "configs/probe_shapes_llava.yaml", f"output_dir={out}",
                f"model.name_or_path={checkpoint}", f"world.image_size={SIZE}", "data.num_pairs=3",
                "data.kinds=[colour,shape]", "probe.top_heads=1", "probe.batch_size=4", "trainer.enable_progress_bar=false", *extra]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(args(killed), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not list((killed / "parts").glob("*.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the probe ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "effects.safetensors").exists()
    resumed = _main(capsys, *args(killed)[2:])  # in this process: no interpreter start-up
    assert resumed.returncode == 0, resumed.stderr
    two = subprocess.run(args(tmp_path / "two", "trainer.strategy=ddp", "trainer.devices=2"), cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((killed / "summary.json").read_text())["probed_before"] >= 1
    resumed, two = load_file(killed / "effects.safetensors"), load_file(tmp_path / "two" / "effects.safetensors")
    assert resumed.keys() == two.keys() and float(resumed["image/language/resid/raw"].nan_to_num().abs().sum()) > 0
    for key in two:  # a killed and resumed single process against two uninterrupted ones: each is the same arrays
        torch.testing.assert_close(resumed[key], two[key], rtol=0, atol=1e-6, equal_nan=True, msg=key)
