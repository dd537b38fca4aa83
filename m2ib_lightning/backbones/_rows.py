"""The pooled token's row of a transformer block, computed alone.

A tower's last block feeds only the pooled token (CLS, EOS or the last
position): every other row of its output is discarded. These functions compute
that one row exactly as the block would (query of one row, keys and values of
all rows), which skips most of the block at every fitting step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _attend(query: Tensor, key: Tensor, value: Tensor, scale: float, bias_row: Tensor | None) -> Tensor:
    """(N, H, 1, d) query over (N, H, T, d) keys/values -> (N, H * d)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if bias_row is not None:
        scores = scores + bias_row
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    return torch.matmul(weights, value).reshape(query.shape[0], -1)


def _row_bias(bias: Tensor | None, rows: Tensor, index: Tensor) -> Tensor | None:
    """The (N, 1, 1, T) slice of an additive (N, 1, T|1, T) mask for query row ``index``."""
    if bias is None:
        return None
    return (bias[:, :, 0] if bias.shape[2] == 1 else bias[rows, :, index]).view(bias.shape[0], 1, 1, -1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    n, t, d = x.shape
    return x.view(n, t, heads, d // heads).transpose(1, 2)


def pre_ln_row(block: nn.Module, hidden: Tensor, bias: Tensor | None, index: Tensor) -> Tensor:
    """CLIP / SigLIP encoder layer (pre-LN, separate q/k/v projections, ``out_proj``)."""
    attn, rows = block.self_attn, torch.arange(hidden.shape[0], device=hidden.device)
    normed = block.layer_norm1(hidden)
    query = split_heads(attn.q_proj(normed[rows, index])[:, None], attn.num_heads)
    key, value = split_heads(attn.k_proj(normed), attn.num_heads), split_heads(attn.v_proj(normed), attn.num_heads)
    out = hidden[rows, index] + attn.out_proj(_attend(query, key, value, attn.scale, _row_bias(bias, rows, index)))
    return out + block.mlp(block.layer_norm2(out))


def blip_vision_row(block: nn.Module, hidden: Tensor, bias: Tensor | None, index: Tensor) -> Tensor:
    """BLIP vision encoder layer (pre-LN, fused ``qkv``, ``projection``)."""
    attn, rows = block.self_attn, torch.arange(hidden.shape[0], device=hidden.device)
    normed = block.layer_norm1(hidden)
    query, key, value = (split_heads(t, attn.num_heads) for t in attn.qkv(normed).chunk(3, dim=-1))
    query = query[rows, :, index][:, :, None]
    out = hidden[rows, index] + attn.projection(_attend(query, key, value, attn.scale, _row_bias(bias, rows, index)))
    return out + block.mlp(block.layer_norm2(out))


def bert_row(block: nn.Module, hidden: Tensor, bias: Tensor | None, index: Tensor) -> Tensor:
    """BERT-style post-LN layer without cross-attention (BLIP's unimodal text encoder)."""
    attn, rows = block.attention.self, torch.arange(hidden.shape[0], device=hidden.device)
    heads = attn.num_attention_heads
    query = split_heads(attn.query(hidden[rows, index])[:, None], heads)
    key, value = split_heads(attn.key(hidden), heads), split_heads(attn.value(hidden), heads)
    context = _attend(query, key, value, attn.attention_head_size**-0.5, _row_bias(bias, rows, index))
    attended = block.attention.output(context, hidden[rows, index])
    return block.output(block.intermediate(attended), attended)
