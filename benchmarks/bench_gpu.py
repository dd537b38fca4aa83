"""Throughput of the engine on a CUDA device against batch size, for each GPU-relevant setting.

``--tables clip``: CLIP ViT-B/32 with random weights (built from its config), defaults of the
reference (layer 9, 10 steps, 10 noise copies). For batch sizes 1..128 it times
``M2IB.attribute`` with ``batch_invariant`` true/false, ``noise_device`` cpu/auto
and ``precision`` 32/bf16, and prints pairs/s and peak GPU memory.

``--tables answers``: M2IB for answers on the LLaVA-1.5- and Qwen2-VL-shaped models of
``bench_engine.py`` (random weights, vision block 3, language-model layer 6, 10 noise copies),
questions/s and peak GPU memory for batches of ``--answer-batches`` questions with
``noise_device`` cpu/auto and ``precision`` 32/bf16.

Without a CUDA device it says so and exits 0 (``--device cpu`` runs it on the CPU anyway, as
a smoke check: e.g. ``--tables answers --answer-batches 1 --repeats 1 --steps 2``).

    python benchmarks/bench_gpu.py [--tables clip answers] [--batches 1 8 32 128] [--answer-batches 1 4 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ANSWER_FAMILIES, answer_pair, make_pairs, vit_b32_clip  # noqa: E402

from m2ib_lightning.answers import attribute_answers  # noqa: E402
from m2ib_lightning.backbones import as_backbone  # noqa: E402
from m2ib_lightning.engine import M2IB, M2IBConfig  # noqa: E402

SETTINGS = [  # (batch_invariant, noise_device, precision)
    (True, "cpu", "32"),
    (False, "cpu", "32"),
    (False, "auto", "32"),
    (False, "auto", "bf16"),
]
ANSWER_SETTINGS = [("cpu", "32"), ("auto", "32"), ("auto", "bf16")]  # (noise_device, precision)


def batch_of(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, ids = zip(*make_pairs("CLIP ViT-B/32", 1) * size)
    return torch.cat(pixels), torch.cat(ids)


def timed(run, device: torch.device, repeats: int) -> tuple[float, float]:
    """(best seconds of ``repeats`` runs after a warm-up, peak memory MiB of the device or NaN on the CPU)."""
    cuda = device.type == "cuda"
    run()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")


def clip_table(device: torch.device, args: argparse.Namespace) -> None:
    print(f"\nCLIP ViT-B/32 random weights, defaults (layer 9, {args.steps} steps, 10 noise copies), best of {args.repeats}")
    print("| batch | batch_invariant | noise_device | precision | pairs / s | peak GPU MiB |")
    print("|---|---|---|---|---|---|")
    model = vit_b32_clip().eval().to(device)
    for size in args.batches:
        pixels, ids = batch_of(size)
        for invariant, noise, precision in SETTINGS:
            explainer = M2IB(model, M2IBConfig(steps=args.steps, batch_invariant=invariant, noise_device=noise, precision=precision))
            seeds = torch.arange(size)
            try:
                best, peak = timed(lambda: explainer.attribute(pixels, ids, seed=seeds), device, args.repeats)
                print(f"| {size} | {invariant} | {noise} | {precision} | {size / best:.1f} | {peak:.0f} |", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {size} | {invariant} | {noise} | {precision} | out of memory | - |", flush=True)
                torch.cuda.empty_cache()


def answer_questions(family: str, model, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``size`` questions of ``bench_engine``'s answer pairs in one batch (Qwen2-VL's patches packed one image after
    the other, with their grids), on ``device``."""
    pairs = [answer_pair(family, model, seed) for seed in range(size)]
    return {k: torch.cat([p[k] for p in pairs]).to(device) for k in pairs[0]}


def answer_table(device: torch.device, args: argparse.Namespace) -> None:
    print(f"\nM2IB for answers, random weights, vision block 3, language-model layer 6, {args.steps} steps, 10 noise "
          f"copies, best of {args.repeats}")
    print("| model | batch | noise_device | precision | questions / s | peak GPU MiB |")
    print("|---|---|---|---|---|---|")
    for family in ANSWER_FAMILIES:
        answer_rows(family, device, args)  # the model is freed when its rows are done
        if device.type == "cuda":
            torch.cuda.empty_cache()


def answer_rows(family: str, device: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = as_backbone(ANSWER_FAMILIES[family]().eval().to(device))
    for size in args.answer_batches:
        batch = answer_questions(family, model.module, size, device)
        inputs = [batch.pop(k) for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")]
        for noise, precision in ANSWER_SETTINGS:
            config = M2IBConfig(vision_layer=3, text_layer=6, steps=args.steps, noise_device=noise, precision=precision)
            try:
                best, peak = timed(lambda: attribute_answers(model, *inputs, config=config, seed=torch.arange(size), **batch),
                                   device, args.repeats)
                print(f"| {family} | {size} | {noise} | {precision} | {size / best:.2f} | {peak:.0f} |", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {family} | {size} | {noise} | {precision} | out of memory | - |", flush=True)
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=["clip", "answers"], choices=["clip", "answers"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--answer-batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke check")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured. Run it on a machine with a GPU.")
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}")
    if "clip" in args.tables:
        clip_table(device, args)
    if "answers" in args.tables:
        answer_table(device, args)


if __name__ == "__main__":
    main()
