"""Throughput of the engine on a CUDA device against batch size, for each GPU-relevant setting.

CLIP ViT-B/32 with random weights (built from its config), defaults of the
reference (layer 9, 10 steps, 10 noise copies). For batch sizes 1..128 it times
``M2IB.attribute`` with ``batch_invariant`` true/false, ``noise_device`` cpu/auto
and ``precision`` 32/bf16, and prints pairs/s and peak GPU memory. Without a
CUDA device it says so and exits 0.

    python benchmarks/bench_gpu.py [--batches 1 8 32 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import make_pairs, vit_b32_clip  # noqa: E402

from m2ib_lightning.engine import M2IB, M2IBConfig  # noqa: E402

SETTINGS = [  # (batch_invariant, noise_device, precision)
    (True, "cpu", "32"),
    (False, "cpu", "32"),
    (False, "auto", "32"),
    (False, "auto", "bf16"),
]


def batch_of(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, ids = zip(*make_pairs("CLIP ViT-B/32", 1) * size)
    return torch.cat(pixels), torch.cat(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured. Run it on a machine with a GPU.")
        return
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; CLIP ViT-B/32 random weights, "
          f"defaults (layer 9, 10 steps, 10 noise copies), best of {args.repeats}")
    print("| batch | batch_invariant | noise_device | precision | pairs / s | peak GPU MiB |")
    print("|---|---|---|---|---|---|")
    model = vit_b32_clip().eval().to(device)
    for size in args.batches:
        pixels, ids = batch_of(size)
        for invariant, noise, precision in SETTINGS:
            explainer = M2IB(model, M2IBConfig(batch_invariant=invariant, noise_device=noise, precision=precision))
            seeds = torch.arange(size)
            try:
                explainer.attribute(pixels, ids, seed=seeds)  # warm-up
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    explainer.attribute(pixels, ids, seed=seeds)
                    torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated() / 2**20
                print(f"| {size} | {invariant} | {noise} | {precision} | {size / best:.1f} | {peak:.0f} |", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {size} | {invariant} | {noise} | {precision} | out of memory | - |", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
