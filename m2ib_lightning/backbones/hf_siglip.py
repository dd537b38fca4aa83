"""Adapter for Hugging Face ``transformers.SiglipModel``.

SigLIP has no CLS token: the image embedding is the attention-pooling head
over every patch (after ``post_layernorm``), so the vision tail runs its last
block whole. The text embedding is the last position of ``final_layer_norm``'s
output through ``text_model.head``; SigLIP is trained on text padded to a fixed
length *without* an attention mask, so padding positions are real tokens to
the model and to M2IB. The fit term stays the cosine similarity.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ._rows import pre_ln_row
from .base import HFLayout, HFPreprocessing, Modality, TowerState, block_output, features
from .hf_clip import check_pixels, check_token_ids, has_pre_ln_blocks
from .loading import HubOptions, load_pretrained


def is_hf_siglip(model: Any) -> bool:
    vision, text = getattr(model, "vision_model", None), getattr(model, "text_model", None)
    return hasattr(vision, "head") and hasattr(text, "head") and hasattr(model, "logit_bias")


class HFSiglipBackbone(HFLayout, HFPreprocessing):
    """Runs a ``transformers.SiglipModel`` tower from or up to any encoder block."""

    num_prefix_tokens = 0
    pad_to_max_length = True
    model_types = ("siglip",)

    def __init__(self, model: nn.Module, processor: Any = None, *, pooled_row_only: bool = True):
        if not is_hf_siglip(model):
            raise TypeError(f"model must be a transformers.SiglipModel with its vision head, got {type(model).__name__}")
        self.module, self.processor = model, processor
        self.config = model.config
        self.max_text_positions = self.config.text_config.max_position_embeddings
        self._vision, self._text = model.vision_model, model.text_model
        self._row_shortcut = pooled_row_only and has_pre_ln_blocks(self.blocks("text")[-1])

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_hf_siglip(model)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, hub: HubOptions | None = None, **options: Any) -> "HFSiglipBackbone":
        from transformers import SiglipModel

        return cls(*load_pretrained(SiglipModel, name_or_path, hub), **options)

    @property
    def text_limit(self) -> int:
        """SigLIP text always has the model's full length: that is where it pools."""
        return self.max_text_positions

    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        return (self._vision if modality == "image" else self._text).encoder.layers

    def validate_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> None:
        vcfg, tcfg = self.config.vision_config, self.config.text_config
        check_pixels(pixel_values, getattr(vcfg, "num_channels", 3), vcfg.image_size)
        check_token_ids(input_ids, tcfg.vocab_size, tcfg.max_position_embeddings)
        if not bool(attention_mask.bool().all()):
            raise ValueError(
                "attention_mask has padding, but SigLIP is used without an attention mask: tokenize with "
                "padding='max_length' and pass attention_mask=None (every position is a real token to SigLIP)"
            )

    def prefix(self, modality: Modality, inputs: dict[str, Tensor], layer: int) -> TowerState:
        if modality == "image":
            hidden = self._vision.embeddings(inputs["pixel_values"])
        else:
            hidden = self._text.embeddings(input_ids=inputs["input_ids"])
        b, t, _ = hidden.shape
        for block in self.blocks(modality)[: layer + 1]:
            hidden = block_output(block(hidden, None))
        token_mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
        pool_index = None if modality == "image" else torch.full((b,), t - 1, dtype=torch.long, device=hidden.device)
        return TowerState(hidden, token_mask, pool_index, layer)

    def tail(self, modality: Modality, hidden: Tensor, state: TowerState) -> Tensor:
        blocks = self.blocks(modality)[state.layer + 1 :]
        if modality == "image":
            for block in blocks:
                hidden = block_output(block(hidden, None))
            return self._vision.head(self._vision.post_layernorm(hidden))
        if len(blocks) and self._row_shortcut:
            for block in blocks[:-1]:
                hidden = block_output(block(hidden, None))
            pooled = pre_ln_row(blocks[-1], hidden, None, state.pool_index)
        else:
            for block in blocks:
                hidden = block_output(block(hidden, None))
            pooled = hidden[:, -1]
        return self._text.head(self._text.final_layer_norm(pooled))

    def embed(self, modality: Modality, inputs: dict[str, Tensor]) -> Tensor:
        if modality == "image":
            return features(self.module.get_image_features(pixel_values=inputs["pixel_values"]))
        return features(self.module.get_text_features(input_ids=inputs["input_ids"]))
