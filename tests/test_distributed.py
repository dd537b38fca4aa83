"""train.py as a user runs it: DDP on 2 CPU processes (gloo), and resuming after SIGKILL.

DDP runs in subprocesses of train.py, never inside pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT
from m2ib_lightning.results import index_entries, read_attributions


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


def _maps(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    records = list(read_attributions(out))
    assert len(records) == len({r.id for r in records})
    return {r.id: (r.image_map, r.text_map) for r in records}


def _assert_same_maps(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key][0], b[key][0], atol=atol, rtol=0)
        torch.testing.assert_close(a[key][1], b[key][1], atol=atol, rtol=0)


def test_two_ddp_processes_give_the_maps_of_one(tmp_path, tiny_bundle):
    _train(*_args(tmp_path / "one", tiny_bundle, "data.num_samples=10", "data.batch_size=4"))
    _train(*_args(tmp_path / "two", tiny_bundle, "data.num_samples=10", "data.batch_size=4",
                  "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"))
    _train(*_args(tmp_path / "bs3", tiny_bundle, "data.num_samples=10", "data.batch_size=3"))
    one, two, bs3 = _maps(tmp_path / "one"), _maps(tmp_path / "two"), _maps(tmp_path / "bs3")
    assert len(one) == 10
    assert sorted(p.name for p in (tmp_path / "two").glob("index-rank*.jsonl")) == ["index-rank0.jsonl", "index-rank1.jsonl"]
    ids = [e["id"] for e in index_entries(tmp_path / "two")]
    assert len(ids) == len(set(ids)) == 10, "a sample was attributed twice or not at all"
    _assert_same_maps(one, two, atol=0)  # bitwise: each sample is fitted alone (m2ib.batch_invariant)
    _assert_same_maps(one, bs3, atol=0)


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_bundle):
    extra = ("data.num_samples=120", "data.batch_size=2")
    _train(*_args(tmp_path / "full", tiny_bundle, *extra))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _args(killed, tiny_bundle, *extra), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while (len(index_entries(killed)) if killed.exists() else 0) < 6:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(index_entries(killed))
    assert 6 <= written < 120, f"the run was not killed halfway ({written} written)"

    _train(*_args(killed, tiny_bundle, *extra))
    ids = [e["id"] for e in index_entries(killed)]
    assert len(ids) == len(set(ids)) == 120
    _assert_same_maps(_maps(tmp_path / "full"), _maps(killed), atol=0)
