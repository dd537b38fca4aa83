"""What every run of ``train.py`` starts with."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..data.world import ShapesWorld
from ..results import atomic_write


def world_of(cfg: DictConfig, seed: int | None = None) -> ShapesWorld:
    """The shapes world a config describes; the held-out one unless ``seed`` says otherwise."""
    seed = cfg.world.heldout_seed if seed is None else seed
    return ShapesWorld(seed=seed, image_size=cfg.world.image_size, max_objects=cfg.world.max_objects, noise=cfg.world.noise)


def prepare_output(cfg: DictConfig, save_config: bool = True) -> Path:
    """Create ``output_dir`` and save the resolved config in it."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if save_config:
        atomic_write(out / "config.yaml", OmegaConf.to_yaml(cfg))
    return out
