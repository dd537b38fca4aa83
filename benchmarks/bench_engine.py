"""Engine vs the naive reference on every shipped adapter at a realistic size (random weights, built from configs).

Prints, per backbone, seconds per pair (both maps, reference defaults), the
speed-up, peak memory and the largest map difference. The naive reference is
the official code's algorithm (m2ib_lightning.testing.naive_m2ib): both towers
in full at every step through the model's own forward, the bottleneck as a hook.

    python benchmarks/bench_engine.py [--pairs 1] [--families "CLIP ViT-B/32" ...]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import m2ib_lightning
from m2ib_lightning.testing import naive_m2ib


def vit_b32_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=32,
        ),
        projection_dim=512,
    )
    return CLIPModel(config)


def siglip_base():
    """google/siglip-base-patch16-224's shapes: 12 x 768 towers, 196 patches, 64 text positions."""
    from transformers import SiglipConfig, SiglipModel

    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = SiglipConfig(text_config=dict(**tower, vocab_size=32000, max_position_embeddings=64),
                          vision_config=dict(**tower, image_size=224, patch_size=16))
    return SiglipModel(config)


def blip_base():
    """Salesforce/blip-itm-base-coco's towers (12 x 768, BERT-base text), at 224 px (the hub model uses 384)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    config = BlipConfig(vision_config=dict(image_size=224, patch_size=16, initializer_range=0.02),
                        text_config=dict(vocab_size=30524))
    return BlipForImageTextRetrieval(config)


#: family -> (builder, image size, text length, (first id, last id), vocabulary, with attention mask)
FAMILIES = {
    "CLIP ViT-B/32": (vit_b32_clip, 224, 8, (49406, 49407), 49000, True),
    "SigLIP base/16": (siglip_base, 224, 64, (None, 1), 32000, False),
    "BLIP-ITC base/16": (blip_base, 224, 12, (101, 102), 30000, True),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pairs(family: str, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, size, length, (first, last), vocab, _ = FAMILIES[family]
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(count):
        ids = torch.randint(3, vocab, (1, length if not FAMILIES[family][5] else length + 3 * i), generator=gen)
        if first is not None:
            ids[0, 0] = first
        ids[0, -1] = last
        pairs.append((torch.randn(1, 3, size, size, generator=gen), ids))
    return pairs


def run_method(family: str, method: str, count: int, out: Path) -> None:
    """One method in this process, so that its peak memory is its own."""
    torch.manual_seed(0)
    model, pairs = FAMILIES[family][0]().eval(), make_pairs(family, count + 1)
    loaded_rss = peak_rss_mib()
    warm_up = pairs.pop(0)  # one untimed pair: first-call costs (allocator, kernels) are not the method's
    m2ib_lightning.attribute(model, *warm_up, steps=2, num_noise=2) if method == "engine" else naive_m2ib(
        model, *warm_up, vision_layer=9, text_layer=9, steps=2, num_noise=2)
    start = time.perf_counter()
    maps = []
    for seed, (pixels, ids) in enumerate(pairs):
        if method == "engine":
            result = m2ib_lightning.attribute(model, pixels, ids, seed=seed)
            maps.append((result.image_maps[0], result.text_maps[0]))
        else:
            image_map, text_map, _, _ = naive_m2ib(model, pixels, ids, vision_layer=9, text_layer=9, seed=seed)
            maps.append((image_map, text_map))
    seconds = (time.perf_counter() - start) / count
    torch.save({"seconds": seconds, "peak": peak_rss_mib(), "loaded": loaded_rss, "maps": maps}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1, help="pairs timed for each method")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--method", choices=["engine", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=list(FAMILIES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return run_method(args.family, args.method, args.pairs, args.out)

    print(f"M2IB engine vs the naive reference: random weights, CPU, {torch.get_num_threads()} threads, "
          f"{args.pairs} pair(s), defaults (layer 9 of 12, 10 steps, 10 noise copies), each method in its own process")
    print("| backbone | naive s / pair | engine s / pair | speed-up | peak RSS MiB naive / engine (model loaded) "
          "| max image-map diff | max text-map diff |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("engine", "naive"):
                out = Path(tmp) / f"{method}.pt"
                cmd = [sys.executable, __file__, "--family", family, "--method", method, "--pairs", str(args.pairs), "--out", str(out)]
                subprocess.run(cmd, check=True)
                results[method] = torch.load(out, weights_only=True)
        engine, naive = results["engine"], results["naive"]
        image_diff = max((e[0] - n[0]).abs().max().item() for e, n in zip(engine["maps"], naive["maps"]))
        text_diff = max((e[1][: len(n[1])] - n[1]).abs().max().item() for e, n in zip(engine["maps"], naive["maps"]))
        print(f"| {family} | {naive['seconds']:.2f} | {engine['seconds']:.2f} | {naive['seconds'] / engine['seconds']:.1f}x "
              f"| {naive['peak']:.0f} / {engine['peak']:.0f} ({engine['loaded']:.0f}) | {image_diff:.1e} | {text_diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
