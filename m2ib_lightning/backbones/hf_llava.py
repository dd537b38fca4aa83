"""Adapter for Hugging Face ``transformers.LlavaForConditionalGeneration``: M2IB explains the answer.

The prompt-then-answer layout is :mod:`~m2ib_lightning.backbones.decoder`'s. The image bottleneck sits on a
block of the vision tower (CLS included, for a CLIP tower), at or before the block whose output the language
model reads (``vision_feature_layer``); the text bottleneck on a language-model layer.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import ImageLayout, Modality, one_image_per_sample, resolve_layer, square_patch_grid
from .capabilities import Site
from .decoder import LANGUAGE_SITES, VISION_SITES, HFDecoderAnswerer
from .questions import HFQuestions


def is_hf_llava(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("vision_tower", "multi_modal_projector", "language_model")) and hasattr(model, "lm_head")


class HFLlavaAnswerer(HFQuestions, HFDecoderAnswerer):
    """Runs a ``LlavaForConditionalGeneration`` on prompts and answers, with bottlenecks placed by the M2IB fit."""

    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"

    def __init__(self, model: nn.Module, processor: Any = None):
        if not is_hf_llava(model):
            raise TypeError(f"HFLlavaAnswerer wraps a transformers LlavaForConditionalGeneration, got {type(model).__name__}")
        self.module, self.processor, self.config = model, processor, model.config
        vision = self.config.vision_config
        self.num_prefix_tokens = 1 if getattr(vision, "model_type", "") == "clip_vision_model" else 0

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_hf_llava(model)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return (*super().capabilities, "answer_attention", "probing")

    # ------------------------------------------------------------------ probing
    #: the language model's layers, and the vision tower's blocks (CLIP's or SigLIP's site names)
    probe_towers = ("language", "vision")

    def probe_sites(self, tower: str) -> tuple[str, ...]:
        return VISION_SITES if tower == "vision" else LANGUAGE_SITES

    def probe_layers(self, tower: str) -> int:
        """Language-model layers; vision blocks up to the last one whose output the language model reads."""
        if tower != "vision":
            return super().probe_layers(tower)
        read = self.config.vision_feature_layer
        count = self.num_layers("image")
        return max(f % (count + 1) for f in (read if isinstance(read, (list, tuple)) else [read]))

    def language_image_grid(self, inputs: dict[str, Tensor]) -> tuple[int, int]:
        """One image token per patch of the square grid (and the CLS feature first under the ``full`` strategy)."""
        return square_patch_grid(self.config, inputs["pixel_values"])

    def language_image_prefix(self) -> int:
        """Under the ``full`` strategy the language model reads the CLS feature too, before the patches'."""
        return self.num_prefix_tokens if self.config.vision_feature_select_strategy == "full" else 0

    def image_keys(self, tower: str, inputs: dict[str, Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """The prompt's image tokens (language model), or the vision tower's patch tokens after its CLS."""
        if tower != "vision":
            return super().image_keys(tower, inputs)
        rows, cols = square_patch_grid(self.config, inputs["pixel_values"])
        return torch.arange(self.num_prefix_tokens, self.num_prefix_tokens + rows * cols), (rows, cols)

    def probe_site(self, tower: str, name: str, layer: int) -> Site:
        if tower != "vision":
            return super().probe_site(tower, name, layer)
        block = self.blocks("image")[layer]
        if name == "resid":
            return Site(block, "output")
        if name == "mlp":
            return Site(block.mlp, "output")
        if name in ("self_attn", "self_head"):
            attention = block.self_attn
            return Site(attention.out_proj, "input", attention.num_heads if name == "self_head" else None)
        raise ValueError(f"site {name!r} is not one of the vision tower's {self.probe_sites(tower)}")

    # ------------------------------------------------------------------ layout
    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        """Vision-tower blocks for ``image`` (transformers 4.x nests the tower once more), LM layers for ``text``."""
        inner = self.module.model
        if modality == "image":
            tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
            return tower.encoder.layers
        return inner.language_model.layers

    def resolve_layer(self, modality: Modality, layer: int, name: str) -> int:
        """A block index; an image bottleneck after the earliest block ``vision_feature_layer`` reads is refused,
        since the language model would read features from before it."""
        count = self.num_layers(modality)
        index = resolve_layer(layer, count, name, "the vision tower" if modality == "image" else "the language model")
        if modality == "image":
            read = self.config.vision_feature_layer
            earliest = min((f % (count + 1)) - 1 for f in (read if isinstance(read, (list, tuple)) else [read]))
            if index > earliest:
                raise ValueError(f"{name}={layer} is block {index}, after block {earliest}, the earliest whose output the "
                                 f"language model reads (vision_feature_layer={read}): the bottleneck would be bypassed")
        return index

    def image_feature_block(self) -> int | None:
        """The block ``vision_feature_layer`` reads (None when it reads several: no tail run then)."""
        read = self.config.vision_feature_layer
        if isinstance(read, (list, tuple)):
            return None
        return read % (self.num_layers("image") + 1) - 1

    def image_features(self, hidden: Tensor) -> Tensor:
        """That block's output, CLS dropped under the ``default`` strategy, through the projector."""
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, self.num_prefix_tokens:]
        projector = getattr(self.module.model, "multi_modal_projector", None) or self.module.multi_modal_projector
        return projector(hidden)

    def image_layout(self, pixel_values: Tensor, batch: int) -> tuple[Tensor, ImageLayout]:
        """Every vision-tower token (CLS included, where there is one), the patches in raster order."""
        one_image_per_sample(pixel_values, batch)
        grid = square_patch_grid(self.config, pixel_values)
        tokens = self.num_prefix_tokens + grid[0] * grid[1]
        layout = ImageLayout.uniform(batch, self.num_prefix_tokens, grid, tuple(pixel_values.shape[-2:]), pixel_values.device)
        return torch.ones(batch, tokens, dtype=torch.bool, device=pixel_values.device), layout
