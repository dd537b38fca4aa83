"""Engine vs the naive reference on a CLIP of ViT-B/32 size (random weights, built from a config).

Prints seconds per pair (both maps, reference defaults), the speed-up, peak
memory and the largest map difference. The naive reference is the official
code's algorithm (tests/naive_m2ib.py): both towers in full at every step,
backward through the unfrozen model.

    python benchmarks/bench_engine.py [--pairs 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from m2ib_lightning.testing import naive_m2ib  # noqa: E402

import m2ib_lightning  # noqa: E402


def vit_b32_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=32,
        ),
        projection_dim=512,
    )
    return CLIPModel(config).eval()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pairs(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(count):
        ids = torch.randint(1, 49000, (1, 8 + 3 * i), generator=gen)
        ids[0, 0], ids[0, -1] = 49406, 49407
        pairs.append((torch.randn(1, 3, 224, 224, generator=gen), ids))
    return pairs


def run_method(method: str, count: int, out: Path) -> None:
    """One method in this process, so that its peak memory is its own."""
    model, pairs = vit_b32_clip(), make_pairs(count)
    loaded_rss = peak_rss_mib()
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
    parser.add_argument("--pairs", type=int, default=2, help="pairs timed for each method")
    parser.add_argument("--method", choices=["engine", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return run_method(args.method, args.pairs, args.out)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("engine", "naive"):
            out = Path(tmp) / f"{method}.pt"
            cmd = [sys.executable, __file__, "--method", method, "--pairs", str(args.pairs), "--out", str(out)]
            subprocess.run(cmd, check=True)
            results[method] = torch.load(out, weights_only=True)
    engine, naive = results["engine"], results["naive"]
    image_diff = max((e[0] - n[0]).abs().max().item() for e, n in zip(engine["maps"], naive["maps"]))
    text_diff = max((e[1] - n[1]).abs().max().item() for e, n in zip(engine["maps"], naive["maps"]))
    print(f"CLIP ViT-B/32 size (random weights), CPU, {torch.get_num_threads()} threads, {args.pairs} pairs, defaults")
    print("| method | s / pair | speed-up | peak RSS MiB (model loaded) | max image-map diff | max text-map diff |")
    print("|---|---|---|---|---|---|")
    for name, r in (("naive reference", naive), ("m2ib_lightning engine", engine)):
        speed = naive["seconds"] / r["seconds"]
        diffs = "- | -" if r is naive else f"{image_diff:.1e} | {text_diff:.1e}"
        print(f"| {name} | {r['seconds']:.2f} | {speed:.1f}x | {r['peak']:.0f} ({r['loaded']:.0f}) | {diffs} |")


if __name__ == "__main__":
    main()
