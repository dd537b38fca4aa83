"""Adapter for Hugging Face ``transformers.CLIPModel`` (transformers 4.4x and 5.x).

The towers are run block by block from the model's own submodules: no hooks,
no replaced modules, nothing left behind. The last block of a tail computes
only the pooled token's row (CLS for images, EOS for text).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rows import pre_ln_row
from .base import (
    HFLayout, HFPreprocessing, Modality, TowerState, attention_probabilities, block_output, features, other, padding_bias,
)
from .capabilities import Site
from .loading import HubOptions, load_pretrained


def is_hf_clip(model: Any) -> bool:
    return all(hasattr(model, name) for name in ("vision_model", "text_model", "visual_projection", "text_projection"))


def has_pre_ln_blocks(block: nn.Module) -> bool:
    """CLIP's block layout, which the pooled-row shortcut relies on."""
    attn = getattr(block, "self_attn", None)
    return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scale")) and all(
        hasattr(block, a) for a in ("layer_norm1", "layer_norm2", "mlp")
    )


class HFCLIPBackbone(HFLayout, HFPreprocessing):
    """Runs a ``transformers.CLIPModel`` tower from or up to any encoder block; probes it as a two-choice matcher."""

    num_prefix_tokens = 1
    model_types = ("clip",)
    probe_towers: tuple[str, ...] = ("image", "text")

    def __init__(self, model: nn.Module, processor: Any = None, *, pooled_row_only: bool = True):
        if not is_hf_clip(model):
            raise TypeError(f"model must be a transformers.CLIPModel, got {type(model).__name__}")
        self.module, self.processor = model, processor
        self.config = model.config
        self.max_text_positions = self.config.text_config.max_position_embeddings
        self._vision, self._text = model.vision_model, model.text_model
        # 4.4x encoder layers take a separate, required `causal_attention_mask`.
        self._needs_causal_arg = "causal_attention_mask" in inspect.signature(self._vision.encoder.layers[0].forward).parameters
        self._row_shortcut = {m: pooled_row_only and has_pre_ln_blocks(self.blocks(m)[-1]) for m in ("image", "text")}

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_hf_clip(model)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return (*super().capabilities, "probing")

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, hub: HubOptions | None = None, **options: Any) -> "HFCLIPBackbone":
        from transformers import CLIPModel

        model, processor = load_pretrained(CLIPModel, name_or_path, hub)
        adapter = cls(model, processor, **options)
        eos = model.config.text_config.eos_token_id
        if processor.tokenizer.eos_token_id != eos and eos != 2:
            raise RuntimeError(
                f"tokenizer EOS id {processor.tokenizer.eos_token_id} differs from the model's eos_token_id {eos}: "
                "the text tower would pool at the wrong token"
            )
        return adapter

    # ----------------------------------------------------------------- layout
    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        return (self._vision if modality == "image" else self._text).encoder.layers

    @property
    def eos_token_id(self) -> int:
        return self.config.text_config.eos_token_id

    def pool_index(self, input_ids: Tensor) -> Tensor:
        """Where the text tower pools: the rule of ``CLIPTextTransformer`` (legacy argmax when eos id is 2)."""
        ids = input_ids.to(torch.int)
        if self.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.eos_token_id).int().argmax(dim=-1)

    def validate_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> None:
        vcfg, tcfg = self.config.vision_config, self.config.text_config
        check_pixels(pixel_values, getattr(vcfg, "num_channels", 3), vcfg.image_size)
        check_token_ids(input_ids, tcfg.vocab_size, tcfg.max_position_embeddings)
        pooled = self.pool_index(input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled_ok = attention_mask.to(torch.bool)[rows, pooled]
        if self.eos_token_id != 2:
            pooled_ok &= input_ids[rows, pooled] == self.eos_token_id
        if not pooled_ok.all():
            bad = (~pooled_ok).nonzero().flatten().tolist()
            raise ValueError(
                f"input_ids rows {bad} have no end-of-text token (id {self.eos_token_id}) among their real "
                "tokens; the text tower pools there, so tokenize with the model's tokenizer"
            )

    # ------------------------------------------------------------ block runs
    def _run_block(self, block: nn.Module, hidden: Tensor, bias: Tensor | None) -> Tensor:
        return block_output(block(hidden, bias, None) if self._needs_causal_arg else block(hidden, bias))

    def prefix(self, modality: Modality, inputs: dict[str, Tensor], layer: int) -> TowerState:
        if modality == "image":
            hidden = self._vision.pre_layrnorm(self._vision.embeddings(inputs["pixel_values"]))
            b, t, _ = hidden.shape
            token_mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
            pool_index, bias = torch.zeros(b, dtype=torch.long, device=hidden.device), None
        else:
            hidden = self._text.embeddings(input_ids=inputs["input_ids"])
            token_mask = inputs["attention_mask"].to(torch.bool)
            pool_index, bias = self.pool_index(inputs["input_ids"]), padding_bias(token_mask, hidden.dtype, causal=True)
        for block in self.blocks(modality)[: layer + 1]:
            hidden = self._run_block(block, hidden, bias)
        return TowerState(hidden, token_mask, pool_index, layer, bias)

    def tail(self, modality: Modality, hidden: Tensor, state: TowerState) -> Tensor:
        blocks = self.blocks(modality)[state.layer + 1 :]
        bias, pool_index = state.attention_bias, state.pool_index
        if len(blocks) and self._row_shortcut[modality]:
            for block in blocks[:-1]:
                hidden = self._run_block(block, hidden, bias)
            pooled = pre_ln_row(blocks[-1], hidden, bias, pool_index)
        else:
            for block in blocks:
                hidden = self._run_block(block, hidden, bias)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_index]
        if modality == "image":
            return self.module.visual_projection(self._vision.post_layernorm(pooled))
        return self.module.text_projection(self._text.final_layer_norm(pooled))

    def embed(self, modality: Modality, inputs: dict[str, Tensor]) -> Tensor:
        if modality == "image":
            return features(self.module.get_image_features(pixel_values=inputs["pixel_values"]))
        return features(self.module.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))


    # ---------------------------------------------------------------- probing
    def default_probe_tower(self, modality: Modality) -> str:
        """The corrupted modality's own tower."""
        return modality

    def probe_sites(self, tower: str) -> tuple[str, ...]:
        return ("resid", "mlp", "self_attn", "self_head")

    def probe_layers(self, tower: str) -> int:
        return self.num_layers(tower)

    def probe_site(self, tower: str, name: str, layer: int) -> Site:
        block = self.blocks(tower)[layer]
        if name == "resid":
            return Site(block, "output")
        if name == "mlp":
            return Site(block.mlp, "output")
        if name in ("self_attn", "self_head"):
            return Site(block.self_attn.out_proj, "input", block.self_attn.num_heads if name == "self_head" else None)
        raise ValueError(f"site {name!r} is not one of CLIP's {self.probe_sites(tower)}")

    def decision_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, modality: Modality) -> dict:
        """Sample 0 of the corrupted modality; the other modality's first two samples are the choices."""
        inputs = {"image": {"pixel_values": pixel_values}, "text": {"input_ids": input_ids, "attention_mask": attention_mask}}
        own, choices = inputs[modality], inputs[other(modality)]
        return {**{k: v[:1] for k, v in own.items()}, "choices": {k: v[:2] for k, v in choices.items()}}

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        """``logit_scale * cos`` of the input's embedding against each choice's: the answers are (0, 1)."""
        choices = self.embed(other(tower), inputs["choices"])
        own = {k: v.expand(rows, *v.shape[1:]) for k, v in inputs.items() if k != "choices"}
        return self.module.logit_scale.exp() * F.normalize(self.embed(tower, own), dim=-1) @ F.normalize(choices, dim=-1).t()

    def pooled_position(self, tower: str, inputs: dict[str, Tensor]) -> int:
        return 0 if tower == "image" else int(self.pool_index(inputs["input_ids"])[0])

    def head_attention(self, tower: str, inputs: dict[str, Tensor]) -> list[Tensor]:
        own = {k: v for k, v in inputs.items() if k != "choices"}
        with self.eager_attention(), torch.no_grad():
            return attention_probabilities(self.attention_modules(tower), lambda: self.embed(tower, own))


def check_pixels(pixel_values: Tensor, channels: int, image_size: int | tuple[int, int]) -> None:
    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    if pixel_values.shape[1] != channels:
        raise ValueError(f"pixel_values must have {channels} channels, got shape {tuple(pixel_values.shape)}")
    if tuple(pixel_values.shape[-2:]) != size:
        raise ValueError(
            f"pixel_values must be {size[0]}x{size[1]} for this model, got {pixel_values.shape[-2]}x{pixel_values.shape[-1]}"
        )


def check_token_ids(input_ids: Tensor, vocab_size: int, max_positions: int) -> None:
    if input_ids.shape[1] > max_positions:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} positions, more than the model's max_position_embeddings={max_positions}"
        )
    if (input_ids < 0).any() or (input_ids >= vocab_size).any():
        raise ValueError(f"input_ids holds ids outside the vocabulary [0, {vocab_size})")
