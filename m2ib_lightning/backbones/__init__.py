"""Backbone adapters: the protocol they meet, the ones shipped, and the registry every task reads."""

from .base import (
    MODALITIES,
    HFPreprocessing,
    Modality,
    TextEncoding,
    TowerState,
    VisionLanguageBackbone,
    resolve_layer,
)
from .hf_blip import HFBlipITCBackbone
from .hf_clip import HFCLIPBackbone
from .hf_siglip import HFSiglipBackbone
from .loading import HubOptions, resolve_model_path
from .registry import (
    BACKBONES,
    UnknownAdapterError,
    adapter_factory,
    adapter_for_config,
    as_backbone,
    load_backbone,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "MODALITIES",
    "HFBlipITCBackbone",
    "HFCLIPBackbone",
    "HFPreprocessing",
    "HFSiglipBackbone",
    "HubOptions",
    "Modality",
    "TextEncoding",
    "TowerState",
    "UnknownAdapterError",
    "VisionLanguageBackbone",
    "adapter_factory",
    "adapter_for_config",
    "as_backbone",
    "load_backbone",
    "register_backbone",
    "resolve_layer",
    "resolve_model_path",
]
