"""Output directories under stress: racing locks and writers, another task's directory, orphans of a kill,
and errors that must be one clear line (exit 2) before anything is written."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, train_main
from m2ib_lightning.results import (
    LOCK_FILE, OutputInUse, RunLock, SHARD_DIR, atomic_write, index_entries, pending_path, shard_names,
)

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _lock_contender(out: str, trials: int, stale: bool, barrier, results) -> None:
    for trial in range(trials):
        barrier.wait()
        if stale and barrier.wait() == 0:  # one contender leaves a dead run's record (no kernel lock) behind
            Path(out, LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
        barrier.wait()
        lock = RunLock(out)
        try:
            lock.acquire()
            results.put((trial, os.getpid()))
        except OutputInUse:
            pass
        barrier.wait()  # both have tried while the holder still holds it
        lock.release()


@pytest.mark.parametrize("stale", [False, True])
def test_two_processes_racing_for_the_lock_one_hundred_times_never_both_hold_it(tmp_path, stale):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_lock_contender, args=(str(tmp_path), 100, stale, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    holders: dict[int, list[int]] = {}
    while not results.empty():
        trial, pid = results.get()
        holders.setdefault(trial, []).append(pid)
    assert sorted(holders) == list(range(100)), "a trial where nobody got the lock"
    assert all(len(pids) == 1 for pids in holders.values()), "two runs held the lock at once"


def test_a_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from m2ib_lightning.results import RunLock;"
        "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"), str(ROOT), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputInUse, match=f"the run of pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # its record stays; the kernel lock went with the process
    with RunLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def _writer(path: str, tag: int, count: int, errors) -> None:
    for i in range(count):
        try:
            atomic_write(Path(path), f"{tag}:{i}:" + "x" * 4096)
        except OSError as err:
            errors.put(repr(err))


def test_two_writers_of_one_file_never_collide(tmp_path):
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    workers = [context.Process(target=_writer, args=(str(tmp_path / "f.json"), tag, 300, errors)) for tag in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert errors.empty(), errors.get()
    content = (tmp_path / "f.json").read_text()
    assert content.endswith("x" * 4096) and content.split(":")[1] == "299"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"], "a temporary file was left behind"


def _train(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _small(out: Path, bundle: Path, *extra: str) -> tuple[str, ...]:
    return (f"output_dir={out}", f"model.name_or_path={bundle}", "m2ib.vision_layer=0", "m2ib.text_layer=1",
            "m2ib.steps=2", "m2ib.num_noise=2", "export.overlays=0", "trainer.enable_progress_bar=false", *extra)


def _refused(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("error: ") and all(p in last for p in phrases), last
    return last


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """train.py's main in this process (no interpreter start-up), as a finished process would report it."""
    capsys.readouterr()
    code = train_main(*args)
    captured = capsys.readouterr()
    # main itself prints no traceback (it returns 2 with one line); what else reaches stderr in this process
    # (Lightning's log handlers of earlier tests, writing to closed streams) is not the run's
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    return subprocess.CompletedProcess(args, code, captured.out, "\n".join(errors[-1:]))


def test_a_run_of_another_task_is_refused_and_the_first_run_still_resumes(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "eval"

    def evaluation(samples: int) -> tuple[str, ...]:
        return ("configs/evaluate_shapes.yaml", f"output_dir={out}", f"model.name_or_path={tiny_bundle}",
                "m2ib.vision_layer=0", "m2ib.text_layer=1", "methods=[random]", "metrics.steps=2",
                f"data.num_samples={samples}", "trainer.enable_progress_bar=false")

    assert _main(capsys, *evaluation(2)).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "summary.json", "run.json")}
    _refused(_main(capsys, *_small(out, tiny_bundle, "data.num_samples=2")), "holds a 'evaluate' run",
             "a 'attribute' run cannot write into it")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _main(capsys, *evaluation(3)).returncode == 0
    assert json.loads((out / "summary.json").read_text())["pairs"] == 3
    identity = json.loads((out / "run.json").read_text())
    assert identity["task"] == "evaluate" and identity["layout"] == 1 and identity["threads"] >= 1
    assert set(identity["settings"]) == {"seed", "model", "m2ib", "world", "methods", "baselines", "metrics"}


def test_results_without_an_identity_are_refused(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "index-rank0.jsonl").write_text('{"id": "x"}\n')
    _refused(_main(capsys, *_small(out, tiny_bundle, "data.num_samples=1")), "holds results without a run.json")


def test_another_thread_count_than_the_runs_is_refused(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "run"
    assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=1", "threads=1")).returncode == 0
    _refused(_main(capsys, *_small(out, tiny_bundle, "data.num_samples=2", "threads=2")), "with 1 intra-op threads")
    own = torch.get_num_threads()
    torch.set_num_threads(2)  # this process's count is not the run's: unset, the run's own is used
    try:
        assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=2")).returncode == 0
    finally:
        torch.set_num_threads(own)
    assert len(list(index_entries(out))) == 2


def test_an_orphan_shard_of_a_killed_commit_is_removed_and_a_committed_one_kept(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "run"
    assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=2", "export.samples_per_shard=1")).returncode == 0
    shards = out / SHARD_DIR
    committed = shard_names(out)[-1]
    pending_path(out, 0).write_text(committed)  # killed after the index append, before the pending file went
    assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=2")).returncode == 0
    assert (shards / committed).exists() and not pending_path(out, 0).exists()

    orphan = "rank1-dead-00000.safetensors"  # a rank of an earlier, wider run, killed between rename and index append
    (shards / orphan).write_bytes(b"never indexed")
    (shards / f".{orphan}.tmp").write_bytes(b"half")
    pending_path(out, 1).write_text(orphan)
    (out / ".summary.json.abc.tmp").write_text("half")
    assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=3")).returncode == 0
    assert sorted(p.name for p in shards.iterdir()) == sorted(shard_names(out))
    assert not list(out.glob(".*.tmp")) and len(list(index_entries(out))) == 3


@pytest.mark.parametrize("override,phrases", [
    ("model.name_or_path=/nonexistent/model", ("model.name_or_path='/nonexistent/model'", "does not exist")),
    ("model.name_or_path=builtin:nope", ("no shipped model 'nope'",)),
    ("model.adapter=hf_siglip", ("model.adapter='hf_siglip'", "serves model types ['siglip']", "'clip' checkpoint")),
    ("trainer.devices=abc", ("trainer.devices='abc'",)),
    ("trainer.strategy=nosuch", ("trainer.strategy='nosuch'", "invalid strategy")),
    ("model.dtype=float8", ("model.dtype='float8'",)),
])
def test_bad_settings_exit_2_with_one_line_before_anything_is_written(tmp_path, tiny_bundle, override, phrases, capsys):
    out = tmp_path / "run"
    _refused(_main(capsys, *_small(out, tiny_bundle, "data.num_samples=1"), override), *phrases)
    assert not out.exists()


@pytest.mark.parametrize("missing,phrase", [
    (("tokenizer.json", "tokenizer_config.json", "vocab.json"), "has no tokenizer"),
    (("preprocessor_config.json", "processor_config.json"), "has no image processor config"),
    (("config.json",), "has no config.json"),
])
def test_an_incomplete_checkpoint_directory_names_what_it_lacks(tmp_path, tiny_bundle, missing, phrase, capsys):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    for name in missing:
        (bundle / name).unlink(missing_ok=True)
    out = tmp_path / "run"
    _refused(_main(capsys, *_small(out, bundle, "data.num_samples=1")), "model.name_or_path=", phrase)
    assert not out.exists()


def test_a_refusal_of_other_settings_exits_2_with_one_line(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "run"
    assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=1")).returncode == 0
    _refused(_main(capsys, *_small(out, tiny_bundle, "data.num_samples=1", "m2ib.beta=0.5")),
             "holds a run with other `m2ib` settings")


def test_hub_options_reach_from_pretrained(tiny_bundle):
    import torch

    from m2ib_lightning.backbones import HubOptions, load_backbone

    backbone = load_backbone(str(tiny_bundle), hub=HubOptions(dtype="bfloat16", attn_implementation="eager",
                                                              local_files_only=True))
    assert next(backbone.module.parameters()).dtype == torch.bfloat16
    assert backbone.module.config._attn_implementation == "eager"
    assert HubOptions().common() == {"local_files_only": False, "trust_remote_code": False}
    assert HubOptions(revision="v1").model()["revision"] == "v1"


def test_a_full_disk_ends_with_one_line_and_keeps_the_shards_written(tmp_path, tiny_bundle, capsys, monkeypatch):
    import errno

    import m2ib_lightning.callbacks.attribution_writer as writer

    out = tmp_path / "run"
    assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=2", "export.samples_per_shard=1")).returncode == 0
    written = shard_names(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", full)
    proc = _main(capsys, *_small(out, tiny_bundle, "data.num_samples=4", "export.samples_per_shard=1"))
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: no space left on device") and "rerun" in last
    assert shard_names(out) == written and len(list(index_entries(out))) == 2  # nothing written before is lost
    monkeypatch.undo()
    assert _main(capsys, *_small(out, tiny_bundle, "data.num_samples=4")).returncode == 0
    assert len(list(index_entries(out))) == 4


def test_a_refused_run_under_torchrun_stops_on_every_rank(tmp_path, tiny_bundle):
    """torchrun starts every rank at once: rank 0's refusal reaches the others, which exit too, not hang."""
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29517", "train.py",
             *_small(out, tiny_bundle, "data.num_samples=2"), "trainer.strategy=ddp", "trainer.devices=2",
             "trainer.accelerator=cpu"], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count(f"is in use by the run of pid {os.getpid()}") == 2, proc.stderr[-3000:]  # both ranks
