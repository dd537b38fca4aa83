"""Attribution runs as a user launches them: throughput with 1 and 2 processes, memory over many pairs.

Runs ``train.py`` (the default config: the shipped shapes CLIP, held-out world
pairs) in subprocesses and samples the resident memory of every process of
the run from /proc twice a second, next to how many pairs were written.

    python benchmarks/bench_runs.py [--pairs 200] [--memory-pairs 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from m2ib_lightning.results import INDEX_PATTERN  # noqa: E402


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found += [child, *_children(child)]
    return found


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(out: Path, pairs: int, processes: int) -> tuple[dict, dict[int, list[tuple[int, float]]]]:
    """Run train.py; return its summary and, per process, (pairs written, RSS MiB) samples."""
    args = [sys.executable, "train.py", f"output_dir={out}", f"data.num_samples={pairs}", "data.batch_size=16",
            "export.overlays=0", "trainer.enable_progress_bar=false"]
    if processes > 1:
        args += ["trainer.strategy=ddp", f"trainer.devices={processes}", "trainer.accelerator=cpu"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: dict[int, list[tuple[int, float]]] = {}
    while proc.poll() is None:
        written = sum(p.read_bytes().count(b"\n") for p in out.glob(INDEX_PATTERN))
        for pid in [proc.pid, *_children(proc.pid)]:
            rss = _rss_mib(pid)
            if rss is not None:
                samples.setdefault(pid, []).append((written, rss))
        time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read()[-3000:])
    return json.loads((out / "summary.json").read_text()), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--memory-pairs", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        print(f"throughput over {args.pairs} pairs (shipped shapes CLIP, batch 16, CPU)")
        print("| processes | wall s | samples / s | speed-up |")
        print("|---|---|---|---|")
        base = None
        for processes in (1, 2):
            summary, _ = run(Path(tmp) / f"speed{processes}", args.pairs, processes)
            rate = summary["samples_per_s"]
            base = base or rate
            print(f"| {processes} | {summary['wall_time_s']:.1f} | {rate:.2f} | {rate / base:.2f}x |")

        print(f"\nresident memory of each process over {args.memory_pairs} pairs (must stay flat)")
        print("| processes | process | RSS after 10% of pairs MiB | peak RSS MiB | growth |")
        print("|---|---|---|---|---|")
        for processes in (1, 2):
            _, samples = run(Path(tmp) / f"memory{processes}", args.memory_pairs, processes)
            workers = [pid for pid, s in samples.items() if max(r for _, r in s) > 200]  # the ranks, not the shell
            for rank, pid in enumerate(sorted(workers)):
                series = samples[pid]
                early = max((r for w, r in series if w <= args.memory_pairs // 10), default=series[0][1])
                peak = max(r for _, r in series)
                print(f"| {processes} | rank {rank} | {early:.0f} | {peak:.0f} | {peak / early:.3f}x |")


if __name__ == "__main__":
    main()
