"""Engine vs the naive reference on every shipped adapter at a realistic size (random weights, built from configs).

Prints, per backbone, seconds per pair (both maps, reference defaults), the
speed-up, peak memory and the largest map difference. The naive reference is
the official code's algorithm (m2ib_lightning.testing.naive_m2ib): both towers
in full at every step through the model's own forward, the bottleneck as a hook.

A second table compares the engine in bf16 (``m2ib.precision=bf16``: the tail
under bfloat16 autocast, alpha, loss and Adam in float32) with float32: speed-up,
the fit's achieved GFLOP/s next to this machine's matmul GFLOP/s in each
precision, the largest map difference and the Spearman rank correlation of the
maps; and, on the shapes world with the shipped CLIP, the pointing game of both.

A third table runs M2IB for answers on a LLaVA-1.5-shaped and a Qwen2-VL-shaped model scaled to CPU: engine vs
the naive reference (K noise copies one at a time, the whole vocabulary), and where one pass's time goes; a fourth
the same models' fits in bf16 against float32.

    python benchmarks/bench_engine.py [--pairs 1] [--families "CLIP ViT-B/32" ...] [--tables reference precision answers answer-precision]
"""

from __future__ import annotations

import argparse
import copy
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


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().double().argsort().argsort().double() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def timed_attribution(model, pairs, precision: str):
    """Seconds per pair and the results, after one untimed warm-up pair."""
    m2ib_lightning.attribute(model, *pairs[0], precision=precision)
    start = time.perf_counter()
    results = [m2ib_lightning.attribute(model, pixels, ids, seed=seed, precision=precision) for seed, (pixels, ids) in enumerate(pairs[1:])]
    return (time.perf_counter() - start) / (len(pairs) - 1), results


def precision_table(families: list[str], count: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    peak = {p: matmul_gflops(d) for p, d in (("32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"\nbf16 vs float32 (engine, defaults, {count} pair(s) after a warm-up; "
          f"this machine's 2048^3 matmul: float32 {peak['32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s)")
    print("| backbone | float32 s / pair | bf16 s / pair | speed-up | fit GFLOP/s float32 / bf16 (share of matmul peak) "
          "| max image-map diff | Spearman image / text capacity |")
    print("|---|---|---|---|---|---|---|")
    for family in families:
        torch.manual_seed(0)
        model, pairs = FAMILIES[family][0]().eval(), make_pairs(family, count + 1)
        with FlopCounterMode(display=False) as counter:
            m2ib_lightning.attribute(model, *pairs[1])
        flops = counter.get_total_flops()
        seconds, results = {}, {}
        for precision in ("32", "bf16"):
            seconds[precision], results[precision] = timed_attribution(model, pairs, precision)
        exact, low = results["32"], results["bf16"]
        image_diff = max((a.image_maps - b.image_maps).abs().max().item() for a, b in zip(exact, low))
        rho_image = min(spearman(a.image_capacity, b.image_capacity) for a, b in zip(exact, low))
        rho_text = min(spearman(a.text_capacity, b.text_capacity) for a, b in zip(exact, low))
        rates = {p: flops / seconds[p] / 1e9 for p in seconds}
        print(f"| {family} | {seconds['32']:.2f} | {seconds['bf16']:.2f} | {seconds['32'] / seconds['bf16']:.2f}x "
              f"| {rates['32']:.0f} ({rates['32'] / peak['32']:.0%}) / {rates['bf16']:.0f} ({rates['bf16'] / peak['bf16']:.0%}) "
              f"| {image_diff:.3f} | {rho_image:.3f} / {rho_text:.3f} |", flush=True)
    shapes_world_fidelity()


def shapes_world_fidelity(samples: int = 128) -> None:
    """Pointing game of float32 and bf16 maps of the shipped CLIP on held-out world pairs (default.yaml's layers)."""
    from m2ib_lightning.backbones import load_backbone
    from m2ib_lightning.shapes.world import ShapesWorld
    from m2ib_lightning.metrics import pointing_game

    backbone = load_backbone("builtin:shapes-clip")
    world = ShapesWorld(seed=1)
    hits, rhos = {"32": [], "bf16": []}, []
    for i in range(samples):
        sample = world.sample(i)
        text = backbone.text_inputs(sample.text)
        pixels, ids = backbone.image_inputs(sample.image)[None], torch.tensor([text.ids])
        maps = {}
        for precision in ("32", "bf16"):
            result = m2ib_lightning.attribute(backbone, pixels, ids, vision_layer=0, text_layer=1, seed=i, precision=precision)
            maps[precision] = result.image_maps
            hits[precision].append(pointing_game(result.image_maps, torch.from_numpy(sample.target_mask)[None]).item())
        rhos.append(spearman(maps["32"], maps["bf16"]))
    mean = {p: sum(v) / len(v) for p, v in hits.items()}
    print(f"\nshapes world, shipped CLIP, {samples} held-out pairs: pointing game float32 {mean['32']:.3f}, "
          f"bf16 {mean['bf16']:.3f} (difference {mean['bf16'] - mean['32']:+.3f}); Spearman of the image maps "
          f"mean {sum(rhos) / len(rhos):.3f}, min {min(rhos):.3f}")


def llava_1_5_scaled():
    """LLaVA-1.5's design scaled to CPU: a CLIP ViT-B/16 tower at 224 px (vision_feature_layer -2, 196 image tokens),
    LLaVA's two-layer projector, a 12-layer 1024-wide Llama over a 32000-word vocabulary."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16),
        text_config=dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
        image_token_index=31999, image_seq_length=196, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)


def qwen2_vl_scaled():
    """Qwen2-VL's design scaled to CPU: a 12-block 768-wide vision transformer (patch 14, 2x2 merger) at 224 px
    (64 image tokens), a 12-layer 1024-wide Qwen2 language model over 32000 words."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(depth=12, embed_dim=768, hidden_size=1024, num_heads=12, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
        image_token_id=31999, video_token_id=31998, vision_start_token_id=31997, vision_end_token_id=31996,
    )
    return Qwen2VLForConditionalGeneration(config)


#: answer family -> builder; each pair: a 224 px picture, a prompt of 12 words around the image tokens, a 2-token answer
ANSWER_FAMILIES = {"LLaVA-1.5 scaled": llava_1_5_scaled, "Qwen2-VL scaled": qwen2_vl_scaled}


def answer_pair(family: str, model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(3, 31000, (n,), generator=gen).tolist()  # noqa: E731
    if family.startswith("Qwen"):
        image = [model.config.vision_start_token_id, *[model.config.image_token_id] * 64, model.config.vision_end_token_id]
        extra = {"pixel_values": torch.randn(256, 3 * 2 * 14 * 14, generator=gen), "image_grid_thw": torch.tensor([[1, 16, 16]])}
    else:
        image = [model.config.image_token_id] * 196
        extra = {"pixel_values": torch.randn(1, 3, 224, 224, generator=gen)}
    ids = torch.tensor([[1, *words(4), *image, *words(8)]])
    return {**extra, "input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_ids": torch.tensor([words(2)]),
            "answer_mask": torch.ones(1, 2, dtype=torch.long)}


def answer_cost_breakdown(model, adapter, pair: dict[str, torch.Tensor], copies: int) -> dict[str, float]:
    """Seconds of one pass over ``copies`` noise copies, split into the vision tower, the language model's layers and
    the vocabulary projection at the answer positions (forward hooks on each part)."""
    parts = {"vision": adapter.blocks("image")[0], "language model": adapter.blocks("text")[0], "vocabulary": model.lm_head}
    spent = dict.fromkeys(parts, 0.0)
    ends = {"vision": adapter.blocks("image")[-1], "language model": adapter.blocks("text")[-1], "vocabulary": model.lm_head}
    started: dict[str, float] = {}
    handles = []
    for name in parts:
        handles.append(parts[name].register_forward_pre_hook(lambda m, a, n=name: started.__setitem__(n, time.perf_counter())))
        handles.append(ends[name].register_forward_hook(
            lambda m, a, o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - started[n])))
    try:
        extra = {k: v for k, v in pair.items() if k not in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")}
        batch = adapter.answer_batch(pair["pixel_values"], pair["input_ids"], pair["attention_mask"], pair["answer_ids"],
                                     pair["answer_mask"], **extra)
        start = time.perf_counter()
        with torch.no_grad():
            adapter.answer_log_likelihood(batch, copies)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return {**spent, "total": total}


def float64_image_map_errors(model, pair: dict[str, torch.Tensor], config, maps: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far float32 image maps (``maps``: engine and naive) lie from the naive reference's in float64: the rounding
    a float32 fit cannot avoid, which Adam at lr 1 grows over the steps."""
    from m2ib_lightning.answers import image_maps_on_pictures, patch_capacity_on_grids
    from m2ib_lightning.backbones import as_backbone
    from m2ib_lightning.testing import naive_answer_m2ib

    exact = as_backbone(copy.deepcopy(model).double())
    pair = {k: v.double() if v.is_floating_point() else v for k, v in pair.items()}
    extra = {k: v for k, v in pair.items() if k not in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")}
    args = [pair[k] for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")]
    capacity = naive_answer_m2ib(exact, *args, modality="image", layer=config.vision_layer, config=config, seed=0,
                                 noise_dtype=torch.float32, **extra)
    layout = exact.answer_batch(*args, **extra).image
    truth = image_maps_on_pictures(patch_capacity_on_grids(capacity[None], layout), layout)
    return {name: (m.double() - truth).abs().max().item() for name, m in maps.items()}


def answer_table(count: int, models: list[str]) -> None:
    """Engine vs the naive reference (m2ib_lightning.testing.naive_answer_m2ib: K copies one at a time, the whole
    vocabulary at every position) on the answer models, and where one fit step's time goes."""
    from m2ib_lightning.answers import image_maps_on_pictures, patch_capacity_on_grids
    from m2ib_lightning.backbones import as_backbone
    from m2ib_lightning.engine import M2IBConfig
    from m2ib_lightning.testing import naive_answer_m2ib

    config = M2IBConfig(vision_layer=3, text_layer=6, steps=10, num_noise=10)
    print(f"\nM2IB for answers, engine vs the naive reference: random weights, CPU, {torch.get_num_threads()} threads, "
          f"{count} pair(s), vision block 3, language-model layer 6, 10 steps, 10 noise copies")
    print("| model | naive s / pair | engine s / pair | speed-up | max image-map diff | image-map diff to float64: naive / "
          "engine | max image / text capacity diff | one pass of 10 copies: vision / language model / vocabulary / total s |")
    print("|---|---|---|---|---|---|---|---|")
    for family in models:
        torch.manual_seed(0)
        model = ANSWER_FAMILIES[family]().eval()
        adapter = as_backbone(model)
        pairs = [answer_pair(family, model, seed) for seed in range(count)]
        seconds = {"engine": 0.0, "naive": 0.0}
        diffs = {"image": 0.0, "text": 0.0, "map": 0.0}
        for seed, pair in enumerate(pairs):
            extra = {k: v for k, v in pair.items() if k not in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")}
            args = [pair[k] for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")]
            start = time.perf_counter()
            result = m2ib_lightning.attribute(model, *args[:3], answer_ids=args[3], answer_mask=args[4], vision_layer=3,
                                              text_layer=6, steps=10, num_noise=10, seed=seed, **extra)
            seconds["engine"] += time.perf_counter() - start
            start = time.perf_counter()
            naive = {m: naive_answer_m2ib(adapter, *args, modality=m, layer=layer, config=config, seed=seed, **extra)
                     for m, layer in (("image", 3), ("text", 6))}
            seconds["naive"] += time.perf_counter() - start
            diffs["image"] = max(diffs["image"], (result.image_capacity[0] - naive["image"]).abs().max().item())
            layout = adapter.answer_batch(*args, **extra).image
            naive_map = image_maps_on_pictures(patch_capacity_on_grids(naive["image"][None], layout), layout)
            diffs["map"] = max(diffs["map"], (result.image_maps - naive_map).abs().max().item())
            if seed == 0:
                first_maps = {"engine": result.image_maps, "naive": naive_map}
            columns = pair["attention_mask"][0].bool().nonzero()[:, 0]
            diffs["text"] = max(diffs["text"], (result.text_capacity[0, columns] - naive["text"][: len(columns)]).abs().max().item())
        # float32's floor: both float32 image maps of the first pair against the naive reference run in float64
        floor = float64_image_map_errors(model, pairs[0], config, first_maps)
        cost = answer_cost_breakdown(model, adapter, pairs[0], 10)
        naive_s, engine_s = seconds["naive"] / count, seconds["engine"] / count
        print(f"| {family} | {naive_s:.1f} | {engine_s:.1f} | {naive_s / engine_s:.2f}x | {diffs['map']:.1e} "
              f"| {floor['naive']:.1e} / {floor['engine']:.1e} | {diffs['image']:.1e} / {diffs['text']:.1e} "
              f"| {cost['vision']:.2f} / {cost['language model']:.2f} / {cost['vocabulary']:.3f} / {cost['total']:.2f} |", flush=True)


def answer_precision_table(count: int, models: list[str]) -> None:
    """The engine on the answer models in bf16 (the model after each bottleneck under autocast) against float32."""
    from m2ib_lightning.backbones import as_backbone

    print(f"\nM2IB for answers, bf16 vs float32 (engine): random weights, CPU, {torch.get_num_threads()} threads, {count} "
          "pair(s), vision block 3, language-model layer 6, 10 steps, 10 noise copies")
    print("| model | float32 s / pair | bf16 s / pair | speed-up | max image-map diff | Spearman image / text capacity (lowest pair) |")
    print("|---|---|---|---|---|---|")
    for family in models:
        torch.manual_seed(0)
        model = ANSWER_FAMILIES[family]().eval()
        as_backbone(model)  # the adapter's checks, outside the timing
        seconds, results = {"32": 0.0, "bf16": 0.0}, {"32": [], "bf16": []}
        for seed in range(count):
            pair = answer_pair(family, model, seed)
            args = [pair.pop(k) for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")]
            for precision in seconds:
                start = time.perf_counter()
                results[precision].append(m2ib_lightning.attribute(
                    model, *args[:3], answer_ids=args[3], answer_mask=args[4], vision_layer=3, text_layer=6, steps=10,
                    num_noise=10, seed=seed, precision=precision, **pair))
                seconds[precision] += time.perf_counter() - start
        full, low = results["32"], results["bf16"]
        image_diff = max((a.image_maps - b.image_maps).abs().max().item() for a, b in zip(full, low))
        rho_image = min(spearman(a.image_capacity, b.image_capacity) for a, b in zip(full, low))
        rho_text = min(spearman(a.text_capacity[a.text_positions], b.text_capacity[a.text_positions]) for a, b in zip(full, low))
        print(f"| {family} | {seconds['32'] / count:.1f} | {seconds['bf16'] / count:.1f} | {seconds['32'] / seconds['bf16']:.2f}x "
              f"| {image_diff:.3f} | {rho_image:.3f} / {rho_text:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1, help="pairs timed for each method")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--tables", nargs="+", default=["reference", "precision", "answers", "answer-precision"],
                        choices=["reference", "precision", "answers", "answer-precision"])
    parser.add_argument("--answer-models", nargs="+", default=list(ANSWER_FAMILIES), choices=list(ANSWER_FAMILIES))
    parser.add_argument("--method", choices=["engine", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=list(FAMILIES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return run_method(args.family, args.method, args.pairs, args.out)
    if "reference" in args.tables:
        reference_table(args)
    if "precision" in args.tables:
        precision_table(args.families, args.pairs)
    if "answers" in args.tables:
        answer_table(args.pairs, args.answer_models)
    if "answer-precision" in args.tables:
        answer_precision_table(args.pairs, args.answer_models)


def reference_table(args: argparse.Namespace) -> None:
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
