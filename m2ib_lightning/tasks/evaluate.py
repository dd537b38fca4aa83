"""A comparison run: M2IB and baseline image maps on held-out world pairs, scored for localisation and faithfulness."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ..baselines import BASELINES, GradientSaliency, ImageTextScore, IntegratedGradientsMap, RandomMap, TokenGradientXActivation
from ..data.attribution import sample_seed
from ..engine import M2IB, M2IBConfig
from ..metrics import CurveAUC, MaskEnergy, PointingGame, perturbation_curve
from ..results import atomic_write
from .common import backbone_of, prepare_output, world_of

MapFn = Callable[[Tensor, Tensor, Tensor, list[str]], Tensor]


def _methods(cfg: DictConfig, model) -> dict[str, MapFn]:
    """name -> f(pixel_values, input_ids, attention_mask, ids) -> maps (B, H, W)."""
    unknown = set(cfg.methods) - {"m2ib", *BASELINES}
    if unknown:
        raise ValueError(f"methods has unknown entries {sorted(unknown)}; choose from {sorted({'m2ib', *BASELINES})}")
    explainer = M2IB(model, M2IBConfig(**cfg.m2ib))
    made = {
        "saliency": GradientSaliency(model),
        "integrated_gradients": IntegratedGradientsMap(model, steps=cfg.baselines.integrated_gradients_steps),
        "grad_x_activation": TokenGradientXActivation(model, layer=cfg.baselines.grad_x_activation_layer),
        "random": RandomMap(model, seed=cfg.seed),
    }
    methods: dict[str, MapFn] = {}
    for name in cfg.methods:
        if name == "m2ib":
            methods[name] = lambda px, ids, mask, keys: explainer.attribute(
                px, ids, mask, seed=torch.tensor([sample_seed(cfg.seed, k) for k in keys])
            ).image_maps
        else:
            methods[name] = lambda px, ids, mask, keys, b=made[name]: b.attribute(px, ids, mask)
    return methods


def run(cfg: DictConfig) -> dict[str, Any]:
    out = prepare_output(cfg)
    backbone = backbone_of(cfg)
    model, processor = backbone.module, backbone.processor
    methods = _methods(cfg, model)
    world = world_of(cfg)
    metrics = {
        name: {"pointing_game": PointingGame(), "energy": MaskEnergy(), "deletion_auc": CurveAUC(), "insertion_auc": CurveAUC()}
        for name in methods
    }
    seconds = dict.fromkeys(methods, 0.0)
    for start in range(0, cfg.data.num_samples, cfg.data.batch_size):
        samples = [world.sample(i) for i in range(start, min(start + cfg.data.batch_size, cfg.data.num_samples))]
        inputs = processor(images=[s.image for s in samples], text=[s.text for s in samples], padding=True, return_tensors="pt")
        px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        targets = torch.stack([torch.from_numpy(s.target_mask) for s in samples])
        score = ImageTextScore(model.eval(), ids, mask)
        for name, method in methods.items():
            tic = time.perf_counter()
            maps = method(px, ids, mask, [s.id for s in samples])
            seconds[name] += time.perf_counter() - tic
            m = metrics[name]
            m["pointing_game"].update(maps, targets)
            m["energy"].update(maps, targets)
            for mode in ("deletion", "insertion"):
                m[f"{mode}_auc"].update(perturbation_curve(score, px, maps, mode=mode, steps=cfg.faithfulness_steps))

    table = {
        name: {**{k: round(v.compute().item(), 4) for k, v in m.items()},
               "seconds_per_pair": round(seconds[name] / cfg.data.num_samples, 4)}
        for name, m in metrics.items()
    }
    summary = {"output_dir": str(out), "pairs": cfg.data.num_samples, "methods": table,
               "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    print(f"\nattribution methods on {cfg.data.num_samples} held-out pairs: {out}")
    print("| method | pointing game | energy in mask | deletion AUC (lower is better) | insertion AUC (higher is better) | s / pair |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['pointing_game']:.3f} | {row['energy']:.3f} | {row['deletion_auc']:.3f} | "
              f"{row['insertion_auc']:.3f} | {row['seconds_per_pair']:.3f} |")
    print()
    return summary
