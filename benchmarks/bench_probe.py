"""Probing one pair over every layer x position x head of the shipped VQA model: the batched engine against a
loop like NOTICE's (one 3-row forward per cell, the clean run recomputed every time).

    python benchmarks/bench_probe.py [--model builtin:shapes-blip-vqa] [--site cross_head]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from notice_reference import trace_important_states  # noqa: E402

from m2ib_lightning.shapes.questions import ShapesVQA  # noqa: E402
from m2ib_lightning.shapes.world import ShapesWorld  # noqa: E402
from m2ib_lightning.probing import ActivationPatching, vqa_minimal_pair  # noqa: E402
from m2ib_lightning.backbones import load_backbone  # noqa: E402

KINDS = {"cross_head": "crossattention_block", "self_head": "attention_block", "resid": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:shapes-blip-vqa")
    parser.add_argument("--site", default="cross_head", choices=list(KINDS))
    args = parser.parse_args()
    adapter = load_backbone(args.model)
    model, processor = adapter.module, adapter.processor
    pair = vqa_minimal_pair(ShapesVQA(ShapesWorld(seed=1), ("colour",)), 0)
    clean = processor(images=pair.clean_image(), text=pair.question, return_tensors="pt")
    corrupt = processor(images=pair.corrupt_image(), text=pair.question, return_tensors="pt")
    answers = tuple(processor.tokenizer.convert_tokens_to_ids([pair.answer, pair.wrong]))
    layers = model.config.text_config.num_hidden_layers
    heads = model.config.text_config.num_attention_heads if args.site.endswith("head") else 1

    start = time.perf_counter()
    result = ActivationPatching(model, batch_size=256).run(clean, corrupt, answers=answers, modality="image", site=args.site)
    engine = time.perf_counter() - start

    start = time.perf_counter()
    tables = [trace_important_states(model, clean, corrupt, answers, "image", layers, KINDS[args.site],
                                     h if args.site.endswith("head") else None) for h in range(heads)]
    reference = time.perf_counter() - start

    ours = result.effect if result.effect.dim() == 3 else result.effect[..., None]
    theirs = torch.stack([t[..., 3].t() for t in tables], dim=-1)
    cells = ours.numel()
    print(f"one pair, site {args.site}: {layers} layers x {ours.shape[1]} positions x {heads} heads = {cells} cells, "
          f"CPU, {torch.get_num_threads()} threads")
    print("| method | seconds | speed-up | max effect difference |")
    print("|---|---|---|---|")
    print(f"| NOTICE-style loop (3-row forward per cell) | {reference:.2f} | 1.0x | - |")
    print(f"| m2ib_lightning (cached, batched) | {engine:.2f} | {reference / engine:.1f}x | "
          f"{(ours.double() - theirs).abs().nan_to_num(0).max().item():.1e} |")


if __name__ == "__main__":
    main()
