"""A probing run: activation patching over minimal pairs of the held-out shapes world.

Writes ``effects.safetensors`` (mean and per-pair effects of every corrupted
modality and site), a PNG heat map of each, and ``summary.json`` with the
clean/corrupted logit differences, flagged pairs, important heads per task and
corrupted modality, and the heads important in all of them ("universal").
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
import time
from pathlib import Path
from typing import Any, List

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from ..shapes.world import WorldSample
from ..backbones.base import pad_token_ids
from ..probing import ActivationPatching, PatchingResult, important_heads, mean_effect, universal_heads
from ..results import atomic_write
from ..viz.figures import labelled_heatmap
from ..backbones.capabilities import require
from .schema import ModelConfig, WorldConfig
from .common import backbone_of, loading, output_owner, prepare_output, world_of

# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class ProbeData:
    num_pairs: int = 12  # minimal pairs of the held-out world, cycling through the attributes
    attributes: List[str] = field(default_factory=lambda: ["colour", "shape", "position"])


@dataclass
class ProbeSettings:
    modalities: List[str] = field(default_factory=lambda: ["image", "text"])  # which side is corrupted
    sites: List[str] = field(default_factory=lambda: ["resid", "mlp", "self_head"])  # also self_attn; "head" = self_head
    direction: str = "denoise"
    batch_size: int = 256
    min_gap: float = 1e-3


@dataclass
class ProbeConfig:
    task: str = "probe"
    seed: int = 0
    output_dir: str = "runs/probe_shapes"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: ProbeData = field(default_factory=ProbeData)
    model: ModelConfig = field(default_factory=ModelConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)


#: this module's tasks and their schemas
SCHEMAS = {"probe": ProbeConfig}


def _pair_inputs(backbone, clean: WorldSample, corrupt: WorldSample, modality: str) -> tuple[Any, Any, Any]:
    """(clean, corrupt, choices) for corrupting ``modality``, through the adapter's preprocessing; the right choice
    for the clean input first."""
    pixels = torch.stack([backbone.image_inputs(clean.image), backbone.image_inputs(corrupt.image)])
    texts = [backbone.text_inputs(t).ids for t in (clean.text, corrupt.text)]
    ids, mask = pad_token_ids(texts, backbone.pad_token_id)
    if modality == "image":
        return pixels[:1], pixels[1:], {"input_ids": ids, "attention_mask": mask}
    if len(texts[0]) != len(texts[1]):
        raise ValueError(f"captions {clean.text!r} and {corrupt.text!r} differ in token count")
    return {"input_ids": ids[:1], "attention_mask": mask[:1]}, {"input_ids": ids[1:], "attention_mask": mask[1:]}, pixels


#: settings that change the results: a rerun into the same output_dir must keep them
RESULT_KEYS = ("seed", "model", "world", "data", "probe")


def run(cfg: DictConfig) -> dict[str, Any]:
    backbone = backbone_of(cfg)
    with loading(cfg):
        require(backbone, "probing", f"a train.py {cfg.task} run")
    out = prepare_output(cfg)
    with output_owner(cfg, RESULT_KEYS, backbone.module).owning():
        return _probe(cfg, out, backbone)


def _probe(cfg: DictConfig, out: Path, backbone) -> dict[str, Any]:
    world = world_of(cfg)
    probe = ActivationPatching(backbone, batch_size=cfg.probe.batch_size, min_gap=cfg.probe.min_gap)
    start = time.perf_counter()
    results: dict[tuple[str, str, str], list[PatchingResult]] = {}  # (attribute, modality, site) -> per pair
    skipped = []
    for index in range(cfg.data.num_pairs):
        attribute = cfg.data.attributes[index % len(cfg.data.attributes)]
        try:
            clean, corrupt, _ = world.minimal_pair(index, attribute)
        except ValueError as err:
            skipped.append({"pair": index, "reason": str(err)})
            continue
        for modality in cfg.probe.modalities:
            try:
                inputs = _pair_inputs(backbone, clean, corrupt, modality)
            except ValueError as err:
                skipped.append({"pair": index, "modality": modality, "reason": str(err)})
                continue
            for site in cfg.probe.sites:
                positions = "pooled" if site == "self_head" else "each"
                result = probe.run(*inputs, modality=modality, site=site, positions=positions, direction=cfg.probe.direction)
                results.setdefault((attribute, modality, site), []).append(result)

    tensors, overview, heads_by_task = {}, {}, {}
    for modality in cfg.probe.modalities:
        for site in cfg.probe.sites:
            group = [r for (a, m, s), rs in results.items() if m == modality and s == site for r in rs]
            if not group:
                continue
            mean, raw, _ = mean_effect(group)
            tensors[f"{modality}/{site}/mean"], tensors[f"{modality}/{site}/raw"] = mean.contiguous(), raw.contiguous()
            columns = [f"h{i}" if site.endswith("head") else str(i) for i in range(mean.shape[1])]
            png = labelled_heatmap(mean, columns, f"{modality} {site}: mean patching effect", "head" if site.endswith("head") else "token")
            atomic_write(out / f"{modality}_{site}.png", png)
            overview[f"{modality}/{site}"] = {
                "pairs": len(group),
                "flagged": sum(r.flagged for r in group),
                "mean_clean_ld": round(float(np.mean([r.clean_ld for r in group])), 4),
                "mean_corrupt_ld": round(float(np.mean([r.corrupt_ld for r in group])), 4),
                "max_mean_effect": round(float(mean.nan_to_num().max()), 4),
            }
    for (attribute, modality, site), group in results.items():
        kept = [r.effect.abs() for r in group if not r.flagged]
        if site == "self_head" and kept:  # CLIP: the corrupted modality's own tower is patched
            heads_by_task[(attribute, modality, modality, "self_head")] = important_heads(torch.stack(kept).mean(0))
    universal = universal_heads(heads_by_task)
    atomic_write(out / "effects.safetensors", lambda tmp: save_file(tensors, str(tmp)))

    summary = {
        "output_dir": str(out),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "skipped": skipped,
        "sites": overview,
        "important_heads": {f"{a}/{m}": [list(h) for h in heads] for (a, m, _, _), heads in heads_by_task.items()},
        "universal_heads": {key: [list(h) for h in heads] for key, heads in universal.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    print(f"\nactivation patching: {out}  ({summary['wall_time_s']} s)")
    print("| corrupted / site | pairs | flagged | mean LD clean | mean LD corrupt | max mean effect |")
    print("|---|---|---|---|---|---|")
    for key, row in overview.items():
        print(f"| {key} | {row['pairs']} | {row['flagged']} | {row['mean_clean_ld']} | {row['mean_corrupt_ld']} | {row['max_mean_effect']} |")
    print(f"important heads (layer, head) per task: {summary['important_heads']}")
    print(f"universal heads: {summary['universal_heads']}\n")
    return summary
