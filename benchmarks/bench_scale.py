"""Attribution runs at scale, with I/O and bookkeeping dominating: does the cost stay flat?

Writes 100,000 pairs of small generated images as WebDataset tar shards (1,000 a
shard, with img2dataset's stats files), builds a tiny random CLIP, and runs
``train.py`` over them with 1 and with 2 processes (1 fit step, 1 noise copy,
so that the fit is cheap and reading, writing and bookkeeping show). Prints:
samples/s; the peak resident memory of each rank at 10% and at 100% of the run;
the seconds of start-up and of the end of the run, and their share of the run;
the files written; and the seconds a rerun needs to skip every pair done.

    python benchmarks/bench_scale.py [--pairs 100000] [--processes 1 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_runs import _children, _rss_mib  # noqa: E402

PER_TAR = 1000
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "cross"]


def write_shards(folder: Path, pairs: int) -> str:
    """``pairs`` 32 x 32 JPEGs with captions, as img2dataset writes them; returns the brace pattern."""
    rng = random.Random(0)
    tars = (pairs + PER_TAR - 1) // PER_TAR
    for t in range(tars):
        count = min(PER_TAR, pairs - t * PER_TAR)
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(count):
                key = f"{t:05d}{i:04d}"
                buffer = io.BytesIO()
                pixels = np.random.default_rng(t * PER_TAR + i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
                caption = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}".encode()
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{t:05d}_stats.json").write_text(json.dumps({"successes": count}))
    return str(folder / f"{{00000..{tars - 1:05d}}}.tar")


def tiny_clip(folder: Path) -> Path:
    from transformers import CLIPProcessor

    from m2ib_lightning.shapes.models.shapes_clip import build_image_processor, build_shapes_clip, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_shapes_clip(tokenizer, image_size=32, width=32, layers=2, heads=2, projection_dim=16, seed=0)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=build_image_processor(32), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def files_in(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def attribute(out: Path, pattern: str, model: Path, processes: int, pairs: int, per_shard: int) -> dict:
    """One run of train.py; returns its summary, its wall time and, per process, RSS at 10% and 100%."""
    args = [sys.executable, "train.py", f"output_dir={out}", f"data.webdataset={pattern}", f"model.name_or_path={model}",
            "m2ib.vision_layer=0", "m2ib.text_layer=0", "m2ib.steps=1", "m2ib.num_noise=1", "m2ib.batch_invariant=false",
            "data.batch_size=256", "data.num_workers=0", f"export.samples_per_shard={per_shard}",
            "export.tensorboard_every_n_batches=100", "trainer.enable_progress_bar=false"]
    if processes > 1:
        args += ["trainer.strategy=ddp", f"trainer.devices={processes}", "trainer.accelerator=cpu"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // processes))})
    at_tenth: dict[int, float] = {}
    peak: dict[int, float] = {}
    while proc.poll() is None:
        shards = out / "shards"
        written = len(os.listdir(shards)) * per_shard if shards.exists() else 0
        for pid in [proc.pid, *_children(proc.pid)]:
            rss = _rss_mib(pid)
            if rss is None:
                continue
            peak[pid] = max(peak.get(pid, 0.0), rss)
            if written < pairs // 10:
                at_tenth[pid] = peak[pid]
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read()[-3000:])
    ranks = sorted(peak, key=lambda pid: -peak[pid])[:processes]  # the launcher's helpers are small
    return {"summary": json.loads((out / "summary.json").read_text()), "wall": wall,
            "rss": [(at_tenth.get(pid, float("nan")), peak[pid]) for pid in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples-per-shard", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        made = time.perf_counter()
        pattern = write_shards(tmp / "data", args.pairs)
        model = tiny_clip(tmp / "model")
        print(f"{args.pairs} pairs in {len(list((tmp / 'data').glob('*.tar')))} tar shards written in "
              f"{time.perf_counter() - made:.0f} s; tiny random CLIP (2 x 32 wide, 32 px); 1 step, 1 noise copy, batch 256, "
              f"{args.samples_per_shard} samples per shard, {os.cpu_count()} cores")
        print("| processes | samples/s | peak RSS MiB per rank at 10% / 100% (growth) | start-up s (share) "
              "| end of run s (share) | files written | rerun skipping all s |")
        print("|---|---|---|---|---|---|---|")
        for processes in args.processes:
            out = tmp / f"run-{processes}"
            first = attribute(out, pattern, model, processes, args.pairs, args.samples_per_shard)
            rerun = attribute(out, pattern, model, processes, args.pairs, args.samples_per_shard)
            summary, wall = first["summary"], first["wall"]
            assert summary["done"] == args.pairs and rerun["summary"]["done"] == 0, (summary["done"], rerun["summary"]["done"])
            rss = ", ".join(f"{a:.0f} / {b:.0f} ({b / a:.2f}x)" for a, b in first["rss"])
            phases = summary["phases"]
            print(f"| {processes} | {summary['samples_per_s']:.0f} | {rss} | {phases['startup_s']:.1f} "
                  f"({phases['startup_s'] / wall:.1%}) | {phases['finish_s']:.2f} ({phases['finish_s'] / wall:.2%}) "
                  f"| {files_in(out)} | {rerun['wall']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
