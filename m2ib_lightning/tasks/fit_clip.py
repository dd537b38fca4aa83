"""Train the small CLIP of the shapes world with Lightning ``fit`` and save it in the hub layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..modules import ContrastiveCLIP
from ..shapes.datasets import ImageToTensor, WorldPairs, WorldRetrieval, collate_pairs, collate_retrieval
from ..shapes.models.shapes_clip import build_image_processor, build_shapes_clip, build_tokenizer
from .common import fit_and_save, prepare_output, world_of, write_fit_summary
from typing import Any, Dict, Optional
from .schema import FitData, FitOptim, WorldConfig

RETRIEVAL_CANDIDATES = 8

# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class FitModel:
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    projection_dim: int = 128


@dataclass
class FitClipConfig:
    task: str = "fit_clip"
    seed: int = 0
    output_dir: str = "runs/fit_shapes_clip"
    save_to: Optional[str] = None  # where save_pretrained writes the model; default OUTPUT_DIR/model
    world: WorldConfig = field(default_factory=WorldConfig)
    data: FitData = field(default_factory=FitData)
    model: FitModel = field(default_factory=FitModel)
    optim: FitOptim = field(default_factory=FitOptim)
    trainer: Dict[str, Any] = field(default_factory=dict)


#: this module's tasks and their schemas
SCHEMAS = {"fit_clip": FitClipConfig}


def run(cfg: DictConfig) -> Path | None:
    """Fit, validate on held-out 8-way retrieval, and ``save_pretrained`` model, tokenizer and processor."""
    from transformers import CLIPProcessor

    L.seed_everything(cfg.seed, workers=True)
    out = prepare_output(cfg)  # the config goes into fit_summary.json
    tokenizer = build_tokenizer()
    image_processor = build_image_processor(cfg.world.image_size)
    to_tensor = ImageToTensor(image_processor, cfg.world.image_size)
    model = build_shapes_clip(tokenizer, image_size=cfg.world.image_size, seed=cfg.seed, **cfg.model)

    train = WorldPairs(world_of(cfg, cfg.world.seed), 0, cfg.data.train_samples, tokenizer, to_tensor)
    heldout = WorldPairs(world_of(cfg, cfg.world.heldout_seed), 0, cfg.data.val_samples, tokenizer, to_tensor)
    pad = tokenizer.pad_token_id
    workers = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(
        train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
        collate_fn=partial(collate_pairs, pad_id=pad), **workers,
    )
    val_loader = DataLoader(
        WorldRetrieval(heldout, RETRIEVAL_CANDIDATES), batch_size=64, collate_fn=partial(collate_retrieval, pad_id=pad)
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    fitted = fit_and_save(cfg, out, ContrastiveCLIP(model, **cfg.optim), train_loader, val_loader, processor)
    if fitted is None:  # not global rank 0, which alone saves and reports
        return None
    save_to, steps, metrics, wall = fitted
    summary = write_fit_summary(cfg, out, fitted, {"retrieval_acc@8": metrics[f"val/retrieval_acc@{RETRIEVAL_CANDIDATES}"]})
    print(f"saved the model to {save_to}: {summary['retrieval_acc@8']:.3f} held-out 8-way retrieval accuracy "
          f"after {steps} steps, {wall / 60:.1f} min")
    return save_to
