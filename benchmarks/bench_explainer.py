"""Exact M2IB against its amortised explainer on held-out pairs of the shapes world: samples/s of each (one process,
the same batch size) and the explainer's fidelity to the exact maps (median Spearman rho on the patch grid and over
each caption's tokens, pointing game and insertion AUC of both).

    python benchmarks/bench_explainer.py [--explainer builtin:shapes-clip-amortised] [--pairs 512] [--batch 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from m2ib_lightning.amortised import AmortisedM2IB, map_agreement  # noqa: E402
from m2ib_lightning.backbones import load_backbone  # noqa: E402
from m2ib_lightning.baselines import Maps  # noqa: E402
from m2ib_lightning.data.attribution import PairStream, WorldSource, collate_attribution  # noqa: E402
from m2ib_lightning.engine import M2IB, M2IBConfig  # noqa: E402
from m2ib_lightning.evaluation import Evaluator  # noqa: E402
from m2ib_lightning.metrics.settings import MetricSettings  # noqa: E402
from m2ib_lightning.shapes.world import ShapesWorld  # noqa: E402


LARGE_BATCHES = (64, 128, 256)  # the amortised explainer's best batch size is machine-dependent: the best of these


def batches(backbone, pairs: int, batch: int, heldout_seed: int):
    world = ShapesWorld(seed=heldout_seed, image_size=64, max_objects=3, noise=0.03)
    items = [i for i in PairStream(WorldSource(world, pairs), backbone, run_seed=0) if "failure" not in i]
    return [collate_attribution(items[k : k + batch], backbone.pad_token_id) for k in range(0, len(items), batch)]


def timed(attribute, batches, repeats: int = 1) -> tuple[list, float]:
    """The results of the first pass and the best samples/s of ``repeats`` passes (a pass of the amortised explainer
    lasts about a second: one pass alone is at the mercy of whatever else the machine does)."""
    passes, rates = [], []
    for _ in range(repeats):
        results, start = [], time.perf_counter()
        for b in batches:
            results.append(attribute(b))
        rates.append(sum(len(b["id"]) for b in batches) / (time.perf_counter() - start))
        passes.append(results)
    return passes[0], max(rates)


def mean_se(values: torch.Tensor) -> str:
    values = values[~values.isnan()]
    return f"{values.mean():.3f} ± {values.std() / len(values) ** 0.5:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:shapes-clip")
    parser.add_argument("--explainer", default="builtin:shapes-clip-amortised")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heldout-seed", type=int, default=1, help="the world of the evaluation (the explainer never saw it)")
    parser.add_argument("--ceiling-pairs", type=int, default=64, help="pairs fitted at 3 more noise seeds: how well two "
                        "exact fits of one pair agree, and the explainer against their mean")
    args = parser.parse_args()
    backbone = load_backbone(args.model)
    config = M2IBConfig(vision_layer=0, text_layer=1, beta=0.1, steps=10, lr=1.0, num_noise=10)
    data = batches(backbone, args.pairs, args.batch, args.heldout_seed)
    exact, amortised = M2IB(backbone, config), AmortisedM2IB(backbone, args.explainer, m2ib=config)
    fast = AmortisedM2IB(backbone, args.explainer, m2ib=M2IBConfig(**{**vars(config), "precision": "bf16"}))

    def run(explainer, b):
        with torch.enable_grad():
            return explainer.attribute(b["pixel_values"], b["input_ids"], b["attention_mask"], seed=b["seed"])

    exact_results, exact_rate = timed(lambda b: run(exact, b), data)
    amortised_results, amortised_rate = timed(lambda b: run(amortised, b), data, repeats=5)
    _, bf16_rate = timed(lambda b: run(fast, b), data, repeats=5)
    large_rate, large_bf16_rate = (max(timed(lambda b: run(explainer, b), batches(backbone, args.pairs, size, args.heldout_seed),
                                             repeats=5)[1]
                                       for size in LARGE_BATCHES) for explainer in (amortised, fast))

    evaluator = Evaluator(backbone, MetricSettings(steps=16, deletion_baseline="zero", insertion_baseline="zero"))
    columns = {name: {"pointing": [], "insertion": [], "text_insertion": []} for name in ("exact", "amortised")}
    agreement = {"image_spearman": [], "text_spearman": [], "image_peak_in_top": []}
    for b, e, a in zip(data, exact_results, amortised_results):
        lengths = b["attention_mask"].sum(1)
        for key, value in map_agreement(a.image_patch_capacity.flatten(1), e.image_patch_capacity.flatten(1),
                                        a.text_capacity, e.text_capacity, lengths).items():
            agreement[key].append(value)
        special = torch.zeros_like(b["input_ids"], dtype=torch.bool)
        for row, flags in enumerate(b["special"]):
            special[row, : len(flags)] = torch.tensor(flags)
        words = b["attention_mask"].bool() & ~special
        clean = evaluator.scorer.clean(b["pixel_values"], b["input_ids"], b["attention_mask"])
        for name, result in (("exact", e), ("amortised", a)):
            values = evaluator.values(Maps(result.image_maps, result.text_maps), b, clean, words)
            columns[name]["pointing"].append(values["pointing_game"])
            columns[name]["insertion"].append(values["image_insertion_auc"])
            columns[name]["text_insertion"].append(values["text_insertion_auc"])
    agreement = {k: torch.cat(v) for k, v in agreement.items()}
    columns = {n: {k: torch.cat(v) for k, v in c.items()} for n, c in columns.items()}

    ceiling = seed_ceiling(exact, data, amortised_results, args.ceiling_pairs)

    print(f"\n{len(agreement['image_spearman'])} held-out pairs (world seed {args.heldout_seed}), {args.model}, "
          f"{args.explainer}, batch {args.batch}, {torch.get_num_threads()} threads\n")
    print("| method | samples/s (batch %d) | speed-up | samples/s (best batch of 64/128/256, float32 / bf16) | pointing game ↑ | "
          "image insertion AUC ↑ | text insertion AUC ↑ |" % args.batch)
    print("|---|---|---|---|---|---|---|")
    print(f"| exact M2IB | {exact_rate:.1f} | 1x | – | {mean_se(columns['exact']['pointing'])} | "
          f"{mean_se(columns['exact']['insertion'])} | {mean_se(columns['exact']['text_insertion'])} |")
    print(f"| amortised | {amortised_rate:.0f} (bf16: {bf16_rate:.0f}) | {amortised_rate / exact_rate:.0f}x | "
          f"{large_rate:.0f} / {large_bf16_rate:.0f} | {mean_se(columns['amortised']['pointing'])} | "
          f"{mean_se(columns['amortised']['insertion'])} | {mean_se(columns['amortised']['text_insertion'])} |")
    image, text = agreement["image_spearman"], agreement["text_spearman"]
    print(f"\nfidelity to the exact maps: median Spearman rho image {image[~image.isnan()].median():.3f}, "
          f"text {text[~text.isnan()].median():.3f}; amortised peak in the exact map's top 10% of patches "
          f"{agreement['image_peak_in_top'].mean():.3f}; pointing game difference "
          f"{(columns['amortised']['pointing'].nanmean() - columns['exact']['pointing'].nanmean()):+.3f}, "
          f"insertion AUC difference {(columns['amortised']['insertion'].mean() - columns['exact']['insertion'].mean()):+.3f}")
    print(f"\nthe noise seed's share, on the first {ceiling['pairs']} pairs fitted at 4 seeds (median Spearman rho, image / "
          f"text): exact seed 0 vs exact seed 1 {ceiling['seed_vs_seed']}; exact seed 0 vs the mean capacity of seeds 1-3 "
          f"{ceiling['seed_vs_mean']}; amortised vs the mean capacity of seeds 0-3 {ceiling['amortised_vs_mean']}")


def seed_ceiling(exact: M2IB, data: list, amortised_results: list, pairs: int) -> dict:
    """How much of an exact map is its noise seed: two seeds' maps of one pair against each other, and against the
    mean over seeds (what an explainer that sees no noise can at best predict)."""
    rows = {k: [] for k in ("seed_vs_seed", "seed_vs_mean", "amortised_vs_mean")}
    done = 0
    for b, a in zip(data, amortised_results):
        if done >= pairs:
            break
        with torch.enable_grad():
            fits = [exact.attribute(b["pixel_values"], b["input_ids"], b["attention_mask"], seed=b["seed"] + k) for k in range(4)]
        lengths = b["attention_mask"].sum(1)
        image = [f.image_patch_capacity.flatten(1) for f in fits]
        text = [f.text_capacity for f in fits]
        mean = lambda ts: torch.stack(ts).mean(0)  # noqa: E731
        for key, (pi, pt, ei, et) in {
            "seed_vs_seed": (image[0], text[0], image[1], text[1]),
            "seed_vs_mean": (image[0], text[0], mean(image[1:]), mean(text[1:])),
            "amortised_vs_mean": (a.image_patch_capacity.flatten(1), a.text_capacity, mean(image), mean(text)),
        }.items():
            rows[key].append(map_agreement(pi, ei, pt, et, lengths))
        done += len(b["id"])
    median = lambda parts, k: torch.cat([p[k] for p in parts]).nanmedian().item()  # noqa: E731
    return {"pairs": done, **{key: f"{median(parts, 'image_spearman'):.3f} / {median(parts, 'text_spearman'):.3f}"
                              for key, parts in rows.items()}}


if __name__ == "__main__":
    main()
