"""A dual encoder in plain torch and its adapter: the worked example of docs/backbones.md.

Nothing here knows Hugging Face: the protocol is all the engine needs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """A pre-LN transformer block; ``mask`` is an additive (B, 1, T, T) attention bias or None."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.heads = heads

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        bias = None if mask is None else mask.expand(-1, self.heads, -1, -1).reshape(-1, *mask.shape[-2:])
        x = x + self.attention(h, h, h, attn_mask=bias, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PlainDualEncoder(nn.Module):
    """Image: 4x4 patches + CLS, mean of nothing: the CLS row is the embedding. Text: mean over real tokens."""

    def __init__(self, vocab: int = 50, width: int = 32, depth: int = 3, heads: int = 4, image_size: int = 16, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.image_pos = nn.Parameter(torch.randn(1, 1 + (image_size // 4) ** 2, width) * 0.1)
        self.image_blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.tokens = nn.Embedding(vocab, width)
        self.text_pos = nn.Parameter(torch.randn(1, 32, width) * 0.1)
        self.text_blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.image_head, self.text_head = nn.Linear(width, dim), nn.Linear(width, dim)
        self.image_size = image_size

    def image_tokens(self, pixels: Tensor) -> Tensor:
        patches = self.patch(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(pixels), -1, -1), patches], 1) + self.image_pos

    def text_tokens(self, ids: Tensor) -> Tensor:
        return self.tokens(ids) + self.text_pos[:, : ids.shape[1]]

    def encode_image(self, pixels: Tensor) -> Tensor:
        x = self.image_tokens(pixels)
        for block in self.image_blocks:
            x = block(x)
        return self.image_head(x[:, 0])

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.text_tokens(ids)
        bias = padding_bias(mask.bool(), x.dtype)
        for block in self.text_blocks:
            x = block(x, bias)
        return self.text_head(mean_over(x, mask.bool()))


def padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive (B, 1, T, T) bias: no query attends to padding."""
    bias = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask[:, None, None, :], torch.finfo(dtype).min).expand(-1, 1, mask.shape[1], -1)


def mean_over(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


# --8<-- [start:adapter]
import zlib  # noqa: E402

import numpy  # noqa: E402

from m2ib_lightning.backbones import TextEncoding, TowerState  # noqa: E402


class PlainAdapter:
    """What M2IB needs from ``PlainDualEncoder``: blocks, a prefix run, a tail run, and the model's own embedding."""

    num_prefix_tokens = 1  # CLS comes before the patch grid

    def __init__(self, model: PlainDualEncoder):
        self.module = model

    @classmethod
    def accepts(cls, model) -> bool:
        return isinstance(model, PlainDualEncoder)

    @classmethod
    def from_pretrained(cls, path: str) -> "PlainAdapter":
        """Loading for train.py: a directory with ``weights.safetensors`` (and a processor, here none)."""
        from safetensors.torch import load_file

        model = PlainDualEncoder()
        model.load_state_dict(load_file(f"{path}/weights.safetensors"))
        return cls(model.eval())

    def blocks(self, modality):
        return self.module.image_blocks if modality == "image" else self.module.text_blocks

    def num_layers(self, modality):
        return len(self.blocks(modality))

    def patch_grid(self, pixel_values):
        return pixel_values.shape[-2] // 4, pixel_values.shape[-1] // 4

    def validate_inputs(self, pixel_values, input_ids, attention_mask):
        size = self.module.image_size
        if tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")

    def embed(self, modality, inputs):
        if modality == "image":
            return self.module.encode_image(inputs["pixel_values"])
        return self.module.encode_text(inputs["input_ids"], inputs["attention_mask"])

    def prefix(self, modality, inputs, layer):
        if modality == "image":
            hidden = self.module.image_tokens(inputs["pixel_values"])
            token_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            bias = None
        else:
            hidden = self.module.text_tokens(inputs["input_ids"])
            token_mask = inputs["attention_mask"].bool()
            bias = padding_bias(token_mask, hidden.dtype)
        for block in self.blocks(modality)[: layer + 1]:
            hidden = block(hidden, bias)
        # pool_index: CLS for images; None for text, which pools over every real token
        pool_index = torch.zeros(len(hidden), dtype=torch.long, device=hidden.device) if modality == "image" else None
        return TowerState(hidden, token_mask, pool_index, layer, bias)

    def tail(self, modality, hidden, state):
        for block in self.blocks(modality)[state.layer + 1 :]:
            hidden = block(hidden, state.attention_bias)
        if modality == "image":
            return self.module.image_head(hidden[:, 0])
        return self.module.text_head(mean_over(hidden, state.token_mask))

    # ---- preprocessing: only train.py runs need it (attribute() takes tensors)
    pad_token_id, BOS, EOS = 0, 1, 2

    def image_inputs(self, image):
        """PIL image -> (3, H, W) in [-1, 1] at the model's size."""
        size = self.module.image_size
        array = numpy.asarray(image.convert("RGB").resize((size, size)), dtype=numpy.float32) / 127.5 - 1
        return torch.from_numpy(array).permute(2, 0, 1)

    def text_inputs(self, text):
        """Words hashed into the vocabulary between BOS and EOS, cut to the 32 positions the model has."""
        words = [3 + zlib.crc32(w.encode()) % (self.module.tokens.num_embeddings - 3) for w in text.lower().split()]
        ids = [self.BOS, *words, self.EOS]
        return TextEncoding(ids if len(ids) <= 32 else [*ids[:31], self.EOS], len(ids))

    def token_strings(self, ids):
        return [{0: "<pad>", 1: "<bos>", 2: "<eos>"}.get(int(i), f"w{int(i)}") for i in ids]

    def special_mask(self, ids):
        return [int(i) < 3 for i in ids]

    def display_image(self, pixel_values):
        return ((pixel_values.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
# --8<-- [end:adapter]
