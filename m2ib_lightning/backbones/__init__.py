"""Backbone adapters: a registry, a factory, and the protocol they meet."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import MODALITIES, Modality, TowerState, VisionLanguageBackbone
from .hf_clip import HFCLIPBackbone, _is_hf_clip

#: name -> callable(model, **options) -> backbone adapter
BACKBONES: dict[str, Callable[..., VisionLanguageBackbone]] = {"hf_clip": HFCLIPBackbone}


def register_backbone(name: str, factory: Callable[..., VisionLanguageBackbone]) -> None:
    """Make an adapter available by name (e.g. from a config's ``model.adapter``)."""
    if name in BACKBONES:
        raise ValueError(f"a backbone adapter named {name!r} is already registered")
    BACKBONES[name] = factory


def as_backbone(model: Any, **options: Any) -> VisionLanguageBackbone:
    """Wrap a plain model in its adapter; an adapter is returned as it is."""
    if isinstance(model, VisionLanguageBackbone):
        return model
    if isinstance(model, nn.Module) and _is_hf_clip(model):
        return HFCLIPBackbone(model, **options)
    raise TypeError(
        f"model must be a transformers.CLIPModel or a backbone adapter (see m2ib_lightning.backbones), "
        f"got {type(model).__name__}"
    )


__all__ = [
    "BACKBONES",
    "MODALITIES",
    "HFCLIPBackbone",
    "Modality",
    "TowerState",
    "VisionLanguageBackbone",
    "as_backbone",
    "register_backbone",
]
