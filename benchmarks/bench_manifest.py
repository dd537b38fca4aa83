"""Reading a large JSONL manifest: peak memory per reader and lines per second, with 1 and with 8 readers.

A reader is one (rank x loader worker) slot: it reads the whole file and keeps the records whose id hashes to
it, checking only those for duplicates. Each reader runs in a process of its own (8 readers two at a time on
2 cores) and reports its peak RSS above the interpreter with the package imported, the seconds to its first
record, and the seconds and lines/s to the end of the file.

    python benchmarks/bench_manifest.py [--lines 2000000] [--readers 8] [--parallel 2]

Targets: peak RSS per reader with 8 readers at most 1/4 of the 1-reader one (above the baseline), and a
2M-line manifest read to the end in under 20 s.
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

READER = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from m2ib_lightning.data.manifest import ManifestSource
from m2ib_lightning.data.records import Failure
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
first, records, failures = None, 0, 0
for entry in ManifestSource(sys.argv[2]).split(int(sys.argv[3]), int(sys.argv[4])):
    if first is None:
        first = time.perf_counter() - start
    if isinstance(entry, Failure):
        failures += 1
    else:
        records += 1
total = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"first_s": first, "total_s": total, "records": records, "failures": failures,
                  "rss_mib": (peak - baseline) / 1024, "baseline_mib": baseline / 1024}))
"""


def write_manifest(path: Path, lines: int) -> None:
    with open(path, "w") as handle:
        for i in range(lines):
            handle.write(json.dumps({"id": f"laion-{i:09d}", "image": f"images/{i % 1000:04d}/{i:09d}.jpg",
                                     "text": f"a photo of thing number {i} on a table"}) + "\n")
        handle.write(json.dumps({"id": "laion-000000007", "image": "x.jpg", "text": "a duplicate"}) + "\n")


def read(path: Path, slot: int, slots: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", READER, str(ROOT), str(path), str(slot), str(slots)],
                            stdout=subprocess.PIPE, text=True)


def run_readers(path: Path, slots: int, parallel: int) -> list[dict]:
    results, pending = [], list(range(slots))
    while pending:
        batch = [read(path, slot, slots) for slot in pending[:parallel]]
        pending = pending[parallel:]
        for proc in batch:
            out, _ = proc.communicate()
            results.append(json.loads(out))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.jsonl"
        started = time.perf_counter()
        write_manifest(path, args.lines)
        print(f"wrote {args.lines + 1} lines ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
        rows = []
        for slots in (1, args.readers):
            results = run_readers(path, slots, args.parallel)
            assert sum(r["records"] for r in results) == args.lines and sum(r["failures"] for r in results) == 1
            rows.append((slots, results))
        print("\n| readers | peak RSS per reader MiB (above baseline), max | first record s, max | "
              "whole file s, max | lines/s per reader | records per reader |")
        print("|---|---|---|---|---|---|")
        for slots, results in rows:
            total = max(r["total_s"] for r in results)
            print(f"| {slots} | {max(r['rss_mib'] for r in results):.1f} | {max(r['first_s'] for r in results):.3f} | "
                  f"{total:.1f} | {(args.lines + 1) / total:,.0f} | {min(r['records'] for r in results):,} - "
                  f"{max(r['records'] for r in results):,} |")
        one, many = rows[0][1][0]["rss_mib"], max(r["rss_mib"] for r in rows[1][1])
        print(f"\nRSS per reader with {args.readers} readers / with 1: {many / one:.3f} (target <= 0.25); "
              f"interpreter baseline {rows[0][1][0]['baseline_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
