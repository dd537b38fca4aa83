"""Probing one pair over every layer x position x head: the batched engine against a loop like NOTICE's (one forward
per cell, the clean run recomputed every time).

    python benchmarks/bench_probe.py [--model builtin:shapes-blip-vqa] [--site cross_head]
    python benchmarks/bench_probe.py --family llava [--model LLAVA_DIR] [--site head]

BLIP VQA: against NOTICE's own ``trace_important_states`` (a 3-row forward per cell). LLaVA: against the same loop
written for a decoder (a 2-row forward per cell: the clean row, and the corrupted row patched from it at the
cell); without ``--model``, a LLaVA of the shapes world's shape (the shipped shapes CLIP as its vision tower, 64
image tokens, a 4-layer 128-wide Llama with random weights: speed does not depend on them).
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


def shapes_shaped_llava():
    """A LLaVA at the shapes world's shape: the shipped shapes CLIP's vision tower, a random 4-layer Llama."""
    from m2ib_lightning.backbones.hf_llava import HFLlavaAnswerer
    from m2ib_lightning.shapes.models.shapes_llava import (
        build_llava_processor, build_llava_tokenizer, build_shapes_llava, init_vision_from_clip,
    )

    clip = load_backbone("builtin:shapes-clip").module
    vision = clip.config.vision_config.to_dict()
    tokenizer = build_llava_tokenizer()
    model = build_shapes_llava(tokenizer, vision, width=128, layers=4, heads=4, vision_feature_layer=-1)
    init_vision_from_clip(model, clip)
    return HFLlavaAnswerer(model.eval(), build_llava_processor(tokenizer, vision["image_size"], vision["patch_size"]))


def notice_style_decoder_loop(adapter, clean: dict, corrupt: dict, answers: tuple[int, int], site: str) -> torch.Tensor:
    """(layers, positions, heads) effects, one cell per forward: rows (clean, corrupted), the corrupted row's
    activation at the cell replaced by the clean row's, as NOTICE's loop does."""
    from m2ib_lightning.probing.patching import site_hooks

    layers = adapter.probe_layers("language")
    sites = [adapter.probe_site("language", site, layer) for layer in range(layers)]
    heads = sites[0].heads or 1
    inputs = {"input_ids": clean["input_ids"].expand(2, -1), "attention_mask": clean["attention_mask"].expand(2, -1),
              "pixel_values": torch.cat([clean["pixel_values"], corrupt["pixel_values"]])}

    def ld(logits):
        return (logits[:, answers[0]] - logits[:, answers[1]]).double()

    with torch.no_grad():
        base = ld(adapter.module(**inputs, logits_to_keep=1).logits[:, -1])
        gap = base[0] - base[1]
        positions = clean["input_ids"].shape[1]
        effects = torch.zeros(layers, positions, heads, dtype=torch.float64)
        for layer in range(layers):
            for position in range(positions):
                for head in range(heads):
                    def edit(at, act, layer=layer, position=position, head=head):
                        if at == layer:
                            width = act.shape[-1] // heads
                            dims = slice(head * width, (head + 1) * width)
                            act[1, position, dims] = act[0, position, dims]

                    with site_hooks(sites, edit):
                        patched = ld(adapter.module(**inputs, logits_to_keep=1).logits[:, -1])
                    effects[layer, position, head] = (patched[1] - base[1]) / gap
    return effects


def llava_main(args: argparse.Namespace) -> None:
    adapter = load_backbone(args.model) if args.model else shapes_shaped_llava()
    site = args.site if args.site in adapter.probe_sites("language") else "head"
    image_size = adapter.config.vision_config.image_size
    pair = vqa_minimal_pair(ShapesVQA(ShapesWorld(seed=1, image_size=image_size), ("colour",)), 0)
    question = adapter.question_inputs(pair.clean_image(), pair.question)
    ids = torch.tensor([question.ids])
    clean = {**adapter.join_inputs([question.image]), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    corrupt = {**clean, **adapter.join_inputs([adapter.question_inputs(pair.corrupt_image(), pair.question).image])}
    answers = (adapter.answer_inputs(pair.answer)[0], adapter.answer_inputs(pair.wrong)[0])

    start = time.perf_counter()
    result = ActivationPatching(adapter, batch_size=256).run(clean, corrupt, answers=answers, modality="image", site=site)
    engine = time.perf_counter() - start
    start = time.perf_counter()
    theirs = notice_style_decoder_loop(adapter, clean, corrupt, answers, site)
    reference = time.perf_counter() - start
    ours = result.effect if result.effect.dim() == 3 else result.effect[..., None]
    layers, positions, heads = ours.shape
    print(f"one pair, LLaVA language-model site {site}: {layers} layers x {positions} positions x {heads} heads = "
          f"{ours.numel()} cells ({int((ids == adapter.image_token_id).sum())} image tokens), CPU, "
          f"{torch.get_num_threads()} threads")
    print("| method | seconds | speed-up | max effect difference |")
    print("|---|---|---|---|")
    print(f"| NOTICE-style loop (2-row forward per cell) | {reference:.2f} | 1.0x | - |")
    print(f"| m2ib_lightning (cached, batched, unchanged cells skipped) | {engine:.2f} | {reference / engine:.1f}x | "
          f"{(ours.double() - theirs).abs().nan_to_num(0).max().item():.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="blip", choices=["blip", "llava"])
    parser.add_argument("--model", default=None, help="default: builtin:shapes-blip-vqa, or a shapes-shaped LLaVA")
    parser.add_argument("--site", default="cross_head", choices=[*KINDS, "attn", "head", "mlp"])
    args = parser.parse_args()
    if args.family == "llava":
        return llava_main(args)
    adapter = load_backbone(args.model or "builtin:shapes-blip-vqa")
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
