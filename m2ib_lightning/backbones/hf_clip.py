"""Adapter for Hugging Face ``transformers.CLIPModel`` (transformers 4.4x and 5.x).

The towers are run block by block from the model's own submodules: no hooks,
no replaced modules, nothing left behind. The last block of a tail computes
only the pooled token's row (CLS for images, EOS for text): every other row of
that block's output is discarded by the pooling, so this is exact and skips
most of the block.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Modality, TowerState


def _is_hf_clip(model: Any) -> bool:
    return all(hasattr(model, name) for name in ("vision_model", "text_model", "visual_projection", "text_projection"))


def projected_features(output: Any) -> Tensor:
    """``get_*_features`` returns a tensor in 4.x and an output object in 5.x."""
    return output if isinstance(output, Tensor) else output.pooler_output


class HFCLIPBackbone:
    """Runs a ``transformers.CLIPModel`` tower from or up to any encoder block."""

    num_prefix_tokens = 1

    def __init__(self, model: nn.Module, *, pooled_row_only: bool = True):
        if not _is_hf_clip(model):
            raise TypeError(f"model must be a transformers.CLIPModel, got {type(model).__name__}")
        self.module = model
        self.config = model.config
        self._vision = model.vision_model
        self._text = model.text_model
        # 4.4x encoder layers take a separate, required `causal_attention_mask`.
        block_params = inspect.signature(self._vision.encoder.layers[0].forward).parameters
        self._needs_causal_arg = "causal_attention_mask" in block_params
        # The pooled-row shortcut needs CLIP's own block layout; anything else runs its last block whole.
        self._row_shortcut = {
            modality: pooled_row_only and self._has_standard_blocks(self._blocks(modality)[-1]) for modality in ("image", "text")
        }

    # ----------------------------------------------------------------- layout
    def _blocks(self, modality: Modality) -> nn.ModuleList:
        return (self._vision if modality == "image" else self._text).encoder.layers

    def num_layers(self, modality: Modality) -> int:
        return len(self._blocks(modality))

    def patch_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        patch = self.config.vision_config.patch_size
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

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
        if pixel_values.shape[1] != vcfg.num_channels:
            raise ValueError(
                f"pixel_values must have {vcfg.num_channels} channels, got shape {tuple(pixel_values.shape)}"
            )
        if tuple(pixel_values.shape[-2:]) != (vcfg.image_size, vcfg.image_size):
            raise ValueError(
                f"pixel_values must be {vcfg.image_size}x{vcfg.image_size} for this model, "
                f"got {pixel_values.shape[-2]}x{pixel_values.shape[-1]}"
            )
        if input_ids.shape[1] > tcfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions, more than the model's "
                f"max_position_embeddings={tcfg.max_position_embeddings}"
            )
        if (input_ids < 0).any() or (input_ids >= tcfg.vocab_size).any():
            raise ValueError(f"input_ids holds ids outside the vocabulary [0, {tcfg.vocab_size})")
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
        if self._needs_causal_arg:
            out = block(hidden, bias, None)
        else:
            out = block(hidden, bias)
        return out[0] if isinstance(out, tuple) else out

    def _text_bias(self, token_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """One additive (B, 1, T, T) mask: causal and padding together."""
        t = token_mask.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=token_mask.device).tril()
        allowed = causal[None, None] & token_mask[:, None, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=token_mask.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _pooled_row(self, block: nn.Module, hidden: Tensor, bias: Tensor | None, pool_index: Tensor) -> Tensor:
        """Output row of ``block`` at ``pool_index`` only; equals ``block(hidden)[rows, pool_index]``."""
        attn = block.self_attn
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        n, t, d = hidden.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        normed = block.layer_norm1(hidden)
        query = attn.q_proj(normed[rows, pool_index]).view(n, heads, 1, head_dim)
        key = attn.k_proj(normed).view(n, t, heads, head_dim).transpose(1, 2)
        value = attn.v_proj(normed).view(n, t, heads, head_dim).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if bias is not None:
            scores = scores + bias[rows, :, pool_index].unsqueeze(2)
        weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
        mixed = torch.matmul(weights, value).reshape(n, d)
        out = hidden[rows, pool_index] + attn.out_proj(mixed)
        return out + block.mlp(block.layer_norm2(out))

    @staticmethod
    def _has_standard_blocks(block: nn.Module) -> bool:
        attn = getattr(block, "self_attn", None)
        return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale"))

    # --------------------------------------------------------------- protocol
    def _embeddings(self, modality: Modality, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Block-0 input, token mask, pool index and attention bias of a batch."""
        if modality == "image":
            pixel_values = inputs["pixel_values"]
            hidden = self._vision.pre_layrnorm(self._vision.embeddings(pixel_values))
            b, t, _ = hidden.shape
            token_mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
            pool_index = torch.zeros(b, dtype=torch.long, device=hidden.device)
            return hidden, token_mask, pool_index, None
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        hidden = self._text.embeddings(input_ids=input_ids)
        token_mask = attention_mask.to(torch.bool)
        return hidden, token_mask, self.pool_index(input_ids), self._text_bias(token_mask, hidden.dtype)

    def prefix(self, modality: Modality, inputs: dict[str, Tensor], layer: int) -> TowerState:
        hidden, token_mask, pool_index, bias = self._embeddings(modality, inputs)
        for block in self._blocks(modality)[: layer + 1]:
            hidden = self._run_block(block, hidden, bias)
        return TowerState(hidden, token_mask, pool_index, layer, bias)

    def tail(self, modality: Modality, hidden: Tensor, state: TowerState) -> Tensor:
        blocks = self._blocks(modality)[state.layer + 1 :]
        bias, pool_index = state.attention_bias, state.pool_index
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if len(blocks) and self._row_shortcut[modality]:
            for block in blocks[:-1]:
                hidden = self._run_block(block, hidden, bias)
            pooled = self._pooled_row(blocks[-1], hidden, bias, pool_index)
        else:
            for block in blocks:
                hidden = self._run_block(block, hidden, bias)
            pooled = hidden[rows, pool_index]
        if modality == "image":
            return self.module.visual_projection(self._vision.post_layernorm(pooled))
        return self.module.text_projection(self._text.final_layer_norm(pooled))

    def embed(self, modality: Modality, inputs: dict[str, Tensor]) -> Tensor:
        if modality == "image":
            return projected_features(self.module.get_image_features(pixel_values=inputs["pixel_values"]))
        return projected_features(
            self.module.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
