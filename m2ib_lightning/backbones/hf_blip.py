"""Adapter for Hugging Face ``transformers.BlipForImageTextRetrieval`` in its contrastive (ITC) mode.

As ``forward(..., use_itm_head=False)`` computes it: the image embedding is
``vision_proj`` of the vision tower's CLS (after ``post_layernorm``), the text
embedding ``text_proj`` of the CLS of the unimodal text encoder (BERT layers,
post-LN, no cross-attention). The ITM head, which fuses both, is not used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ._rows import bert_row, blip_vision_row
from .base import HFLayout, HFPreprocessing, Modality, TowerState, block_output, padding_bias
from .hf_clip import check_pixels, check_token_ids
from .loading import HubOptions, load_pretrained


def is_hf_blip_itc(model: Any) -> bool:
    return all(hasattr(model, name) for name in ("vision_model", "text_encoder", "vision_proj", "text_proj"))


class HFBlipITCBackbone(HFLayout, HFPreprocessing):
    """Runs a ``transformers.BlipForImageTextRetrieval`` tower (ITC mode) from or up to any encoder block."""

    num_prefix_tokens = 1
    model_types = ("blip",)
    architectures = ("BlipForImageTextRetrieval",)

    def __init__(self, model: nn.Module, processor: Any = None, *, pooled_row_only: bool = True):
        if not is_hf_blip_itc(model):
            raise TypeError(f"model must be a transformers.BlipForImageTextRetrieval, got {type(model).__name__}")
        self.module, self.processor = model, processor
        self.config = model.config
        self.max_text_positions = self.config.text_config.max_position_embeddings
        self._vision, self._text = model.vision_model, model.text_encoder
        self._row_shortcut = pooled_row_only

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_hf_blip_itc(model)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, hub: HubOptions | None = None, **options: Any) -> "HFBlipITCBackbone":
        from transformers import BlipForImageTextRetrieval

        return cls(*load_pretrained(BlipForImageTextRetrieval, name_or_path, hub), **options)

    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        return self._vision.encoder.layers if modality == "image" else self._text.encoder.layer

    def validate_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> None:
        vcfg, tcfg = self.config.vision_config, self.config.text_config
        check_pixels(pixel_values, getattr(vcfg, "num_channels", 3), vcfg.image_size)
        check_token_ids(input_ids, tcfg.vocab_size, tcfg.max_position_embeddings)
        if not bool(attention_mask[:, 0].bool().all()):
            raise ValueError("attention_mask marks position 0 as padding, but BLIP pools its first token ([CLS]): pad on the right")

    def _run(self, modality: Modality, block: nn.Module, hidden: Tensor, bias: Tensor | None) -> Tensor:
        return block_output(block(hidden, attention_mask=bias))  # keywords: 4.4x and 5.x order the arguments differently

    def prefix(self, modality: Modality, inputs: dict[str, Tensor], layer: int) -> TowerState:
        if modality == "image":
            hidden = self._vision.embeddings(inputs["pixel_values"])
            token_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            bias = None
        else:
            hidden = self._text.embeddings(input_ids=inputs["input_ids"])
            token_mask = inputs["attention_mask"].to(torch.bool)
            bias = padding_bias(token_mask, hidden.dtype)
        for block in self.blocks(modality)[: layer + 1]:
            hidden = self._run(modality, block, hidden, bias)
        pool_index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        return TowerState(hidden, token_mask, pool_index, layer, bias)

    def tail(self, modality: Modality, hidden: Tensor, state: TowerState) -> Tensor:
        blocks = self.blocks(modality)[state.layer + 1 :]
        if len(blocks) and self._row_shortcut:
            for block in blocks[:-1]:
                hidden = self._run(modality, block, hidden, state.attention_bias)
            row = blip_vision_row if modality == "image" else bert_row
            pooled = row(blocks[-1], hidden, state.attention_bias, state.pool_index)
        else:
            for block in blocks:
                hidden = self._run(modality, block, hidden, state.attention_bias)
            pooled = hidden[:, 0]
        if modality == "image":
            return self.module.vision_proj(self._vision.post_layernorm(pooled))
        return self.module.text_proj(pooled)

    def embed(self, modality: Modality, inputs: dict[str, Tensor]) -> Tensor:
        if modality == "image":
            return self.module.vision_proj(self._vision(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0])
        out = self._text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return self.module.text_proj(out.last_hidden_state[:, 0])
