"""train.py as a user runs it: DDP on 2 CPU processes (gloo), and resuming after SIGKILL.

DDP runs in subprocesses of train.py, never inside pytest.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from m2ib_lightning.results import RunLock, index_entries, read_attributions


def _args(out: Path, bundle: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "train.py", f"output_dir={out}", f"model.name_or_path={bundle}", "m2ib.vision_layer=0",
        "m2ib.text_layer=1", "m2ib.steps=4", "m2ib.num_noise=3", "export.overlays=0",
        "trainer.enable_progress_bar=false", *extra,
    ]


# One intra-op thread in every process, as Lightning itself sets for 2 DDP processes on 2 cores:
# float reductions split over another thread count round differently, and that is not under test.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _train(*args: str) -> None:
    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _train_here(capsys, *args: str) -> None:
    """A one-process run of train.py in this process (no interpreter start-up), on one intra-op thread as the
    subprocesses: ``args`` as for :func:`_train`."""
    from test_edges_runs import _main

    assert list(args[:2]) == [sys.executable, "train.py"]
    proc = _main(capsys, *args[2:], "threads=1")
    assert proc.returncode == 0, proc.stderr


def _maps(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    records = list(read_attributions(out))
    assert len(records) == len({r.id for r in records})
    return {r.id: (r.image_map, r.text_map) for r in records}


def _assert_same_maps(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key][0], b[key][0], atol=atol, rtol=0)
        torch.testing.assert_close(a[key][1], b[key][1], atol=atol, rtol=0)


def _ids(out: Path) -> list[str]:
    return [e["id"] for e in index_entries(out)]


def _ddp(processes: int) -> tuple[str, ...]:
    return ("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu") if processes == 2 else ()


def test_two_ddp_processes_give_the_maps_of_one(tmp_path, tiny_bundle, capsys):
    _train_here(capsys, *_args(tmp_path / "one", tiny_bundle, "data.num_samples=10", "data.batch_size=4"))
    _train(*_args(tmp_path / "two", tiny_bundle, "data.num_samples=10", "data.batch_size=4", *_ddp(2)))
    _train_here(capsys, *_args(tmp_path / "bs3", tiny_bundle, "data.num_samples=10", "data.batch_size=3"))
    one, two, bs3 = _maps(tmp_path / "one"), _maps(tmp_path / "two"), _maps(tmp_path / "bs3")
    assert len(one) == 10
    assert sorted(p.name for p in (tmp_path / "two").glob("index-rank*.jsonl")) == ["index-rank0.jsonl", "index-rank1.jsonl"]
    ids = _ids(tmp_path / "two")
    assert len(ids) == len(set(ids)) == 10, "a sample was attributed twice or not at all"
    _assert_same_maps(one, two, atol=0)  # bitwise: each sample is fitted alone (m2ib.batch_invariant)
    _assert_same_maps(one, bs3, atol=0)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[0]["localisation"] == summaries[1]["localisation"]  # synced across ranks, not rank 0's share
    assert summaries[1]["done"] == 10


def test_a_live_run_is_refused_naming_it_and_a_stale_lock_is_taken_over(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):  # this process is the live run
        proc = subprocess.run(_args(out, tiny_bundle, "data.num_samples=2"), cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and f"in use by the run of pid {os.getpid()}" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith("error: output_dir=")
    assert sorted(p.name for p in out.iterdir()) == [], "a refused run wrote something"

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    (out / "run.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
    _train_here(capsys, *_args(out, tiny_bundle, "data.num_samples=2"))
    assert len(_ids(out)) == 2 and not (out / "run.lock").exists()


def test_an_evaluation_on_two_processes_gives_the_table_of_one(tmp_path, tiny_bundle, capsys):
    def evaluate(out: Path, *extra: str) -> dict:
        (_train if extra else functools.partial(_train_here, capsys))(sys.executable, "train.py", "configs/evaluate_shapes.yaml", f"output_dir={out}", f"model.name_or_path={tiny_bundle}",
               "data.num_samples=6", "data.batch_size=2", "m2ib.vision_layer=0", "m2ib.text_layer=1", "m2ib.steps=2",
               "m2ib.num_noise=2", "metrics.steps=4", "methods=[m2ib,saliency,rise,chefer,random]",
               "baselines={rise: {masks: 16, chunk: 8}}", "trainer.enable_progress_bar=false", *extra)
        return json.loads((out / "summary.json").read_text())["methods"]

    one = evaluate(tmp_path / "one")
    two = evaluate(tmp_path / "two", *_ddp(2))
    assert set(one) == set(two) == {"m2ib", "saliency", "rise", "chefer", "random"}
    for method, row in one.items():
        assert row["samples"] == two[method]["samples"] == 6
        for metric, value in row.items():
            if metric != "samples_per_s" and value is not None:
                assert two[method][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (method, metric)


def test_records_failing_on_any_rank_are_listed_in_failures_jsonl(tmp_path, tiny_bundle):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    rows = [{"id": "gone-0", "image": "missing-0.png", "text": "a red circle"},  # position 0: rank 0
            {"id": "gone-1", "image": "missing-1.png", "text": "a red circle"},  # position 1: rank 1
            *({"id": f"ok-{i}", "image": "red.png", "text": "a red circle"} for i in range(4))]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    _train(*_args(out, tiny_bundle, f"data.manifest={tmp_path / 'm.jsonl'}", "data.batch_size=2", *_ddp(2)))
    reports = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in reports) == ["gone-0", "gone-1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 4 and summary["failed"] == 2


def test_six_kills_at_random_moments_alternating_1_and_2_processes_lose_and_duplicate_nothing(tmp_path, tiny_bundle, capsys):
    """SIGKILL of the whole process group at 6 seeded random moments, resuming under 1, then 2, then 1 ...
    processes (so every resume changes the topology: 1 -> 2 and 2 -> 1, three times each), with no thread count
    in the environment (the run's identity pins it): every id once, maps bitwise those of an uninterrupted
    run, no orphan shard, temporary or pending file, no lock left, an index that reads."""
    import random

    extra = ("data.num_samples=32", "data.batch_size=2", "export.samples_per_shard=3", "m2ib.steps=3")
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    out, rng = tmp_path / "killed", random.Random(14)
    finished = 0
    for attempt in range(6):
        proc = subprocess.Popen(_args(out, tiny_bundle, *extra, *_ddp(1 + attempt % 2)), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=rng.uniform(1.0, 5.0))
            finished += 1
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert finished < 3, f"{finished} of 6 runs ended before their kill: the moments are too late to test anything"
    proc = subprocess.run(_args(out, tiny_bundle, *extra, *_ddp(2)), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from test_edges_runs import _main

    threads = json.loads((out / "run.json").read_text())["threads"]
    assert _main(capsys, *_args(tmp_path / "full", tiny_bundle, *extra, f"threads={threads}")[2:]).returncode == 0

    lines = [json.loads(line) for path in sorted(out.glob("index-rank*.jsonl")) for line in path.read_text().splitlines()]
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)) == 32, "a sample was lost or attributed twice"
    _assert_same_maps(_maps(tmp_path / "full"), _maps(out), atol=0)
    shards = {p.name for p in (out / "shards").iterdir()}
    assert shards == {line["shard"] for line in lines}, "an orphan shard, temporary or pending file is left"
    assert not list(out.glob(".*.tmp")) and not (out / "run.lock").exists()


def test_a_manifest_run_resumed_on_two_ranks_reads_only_its_share_of_the_done_ids(tmp_path, tiny_bundle, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    rows = [{"id": f"ok-{i}", "image": "red.png", "text": "a red circle"} for i in range(10)]
    (tmp_path / "six.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (tmp_path / "ten.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    _train_here(capsys, *_args(out, tiny_bundle, f"data.manifest={tmp_path / 'six.jsonl'}", f"data.root={tmp_path}"))
    _train(*_args(out, tiny_bundle, f"data.manifest={tmp_path / 'ten.jsonl'}", f"data.root={tmp_path}", *_ddp(2)))
    ids = _ids(out)
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 6 and summary["done"] == 4 and summary["total_in_output"] == 10


def test_a_fit_on_two_ddp_processes_saves_one_loadable_model_and_one_summary(tmp_path):
    """End to end through train.py: both ranks train, rank 0 alone saves and reports, the other rank exits 0."""
    from transformers import CLIPModel

    out = tmp_path / "fit"
    _train(sys.executable, "train.py", "configs/fit_shapes_clip.yaml", f"output_dir={out}", "data.train_samples=64",
           "data.batch_size=8", "data.val_samples=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
           "model.width=32", "model.layers=1", "model.heads=2", "trainer.enable_progress_bar=false", *_ddp(2))
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["retrieval_acc@8"] <= 1.0
    assert CLIPModel.from_pretrained(out / "model").config.vision_config.num_hidden_layers == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "fit_summary.json", "model", "tensorboard"]


@pytest.mark.parametrize("family", ["hf_qwen2_vl"])  # packed images: the family whose batches ranks split most differently
def test_a_vqa_run_on_two_ddp_processes_gives_the_maps_of_one(tmp_path, family, capsys):
    from test_vqa_runs import FAMILIES, SIZE

    checkpoint = FAMILIES[family](tmp_path / family)
    args = (f"model.name_or_path={checkpoint}", f"world.image_size={SIZE}",
            "m2ib.steps=2", "m2ib.num_noise=2", "data.num_samples=6", "data.batch_size=2", "export.overlays=0",
            "trainer.enable_progress_bar=false")
    config = ("train.py", "configs/attribute_shapes_vqa.yaml")
    _train_here(capsys, sys.executable, *config, f"output_dir={tmp_path / 'one'}", *args)
    _train(sys.executable, *config, f"output_dir={tmp_path / 'two'}", *args, *_ddp(2))
    one, two = _maps(tmp_path / "one"), _maps(tmp_path / "two")
    assert len(one) == 6 and sorted(_ids(tmp_path / "two")) == sorted(one)
    # the same samples, fitted in other batches: float32 rounds a batch of other (packed) images differently,
    # by ~1e-5 nats on Qwen2-VL (batch invariance is exact in float64: tests/test_answers.py)
    _assert_same_maps(one, two, atol=1e-5 if family == "hf_blip_vqa" else 1e-4)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[0]["localisation_pairs"] == summaries[1]["localisation_pairs"] == 6


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_stops_a_run_after_the_batch_in_hand_and_the_rerun_resumes(tmp_path, tiny_bundle, processes):
    """A scheduler's SIGTERM to the job's processes (Lightning's predict loop alone would ignore it): the run stops
    with status 143 soon after, keeps what it wrote, releases the lock; the same command then does the rest on one
    process, every id once."""
    import time

    extra = ("data.num_samples=100", "data.batch_size=2", "export.samples_per_shard=2", "m2ib.steps=3")
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_args(out, tiny_bundle, *extra, *_ddp(processes)), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in out.glob("index-rank*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run went on after SIGTERM")
    assert proc.returncode == 143 and "received SIGTERM" in stderr, stderr[-2000:]
    kept = [e["id"] for e in index_entries(out)]
    assert 0 < len(kept) < 100 and not (out / "run.lock").exists()
    _train(*_args(out, tiny_bundle, *extra))
    ids = [e["id"] for e in index_entries(out)]
    assert len(ids) == len(set(ids)) == 100 and set(kept) <= set(ids)
