"""The small BLIP VQA model of the shapes world: tokenizer, processor, config, and a start from the shapes CLIP.

It is a plain ``transformers.BlipForQuestionAnswering``, saved in the hub layout
(config, safetensors, WordPiece tokenizer, processor config), so
``from_pretrained("builtin:shapes-blip-vqa")`` goes through the same code as a
downloaded BLIP. Answers are one word; the answer decoder starts from
``decoder_start_token_id`` (``[DEC]``), in training as in probing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..questions import vqa_vocabulary
from .shapes_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def build_vqa_tokenizer(max_length: int = 32):
    """A lower-casing WordPiece tokenizer over the world's words: [CLS] question [SEP], pad 0, [DEC] as BOS."""
    from transformers import BertTokenizer

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vqa_vocabulary()])}
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=max_length)


def build_vqa_image_processor(image_size: int):
    from transformers import BlipImageProcessor

    return BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
    )


def build_shapes_blip_vqa(
    tokenizer,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    vision_layers: int = 4,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
):
    """A freshly initialised ``BlipForQuestionAnswering`` sized for the shapes world (CLIP-shaped vision tower)."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=width, encoder_hidden_size=width, intermediate_size=4 * width,
            num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=vision_layers, num_attention_heads=heads,
            image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu",
        ),
    )
    torch.manual_seed(seed)
    return BlipForQuestionAnswering(config)


@torch.no_grad()
def init_vision_from_clip(blip: nn.Module, clip: nn.Module) -> None:
    """Copy a CLIP vision tower into a BLIP one of the same shape (BLIP has no pre-LayerNorm; training adapts)."""
    src, dst = clip.vision_model, blip.vision_model
    if len(src.encoder.layers) != len(dst.encoder.layers) or src.config.hidden_size != dst.config.hidden_size:
        raise ValueError("the CLIP and BLIP vision towers differ in depth or width")
    dst.embeddings.class_embedding.copy_(src.embeddings.class_embedding.view_as(dst.embeddings.class_embedding))
    dst.embeddings.patch_embedding.weight.copy_(src.embeddings.patch_embedding.weight)
    dst.embeddings.patch_embedding.bias.zero_()
    dst.embeddings.position_embedding.copy_(src.embeddings.position_embedding.weight[None])
    for a, b in zip(src.encoder.layers, dst.encoder.layers):
        attn = a.self_attn
        b.self_attn.qkv.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        b.self_attn.qkv.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        b.self_attn.projection.load_state_dict(attn.out_proj.state_dict())
        for name in ("layer_norm1", "layer_norm2", "mlp"):
            getattr(b, name).load_state_dict(getattr(a, name).state_dict())
    dst.post_layernorm.load_state_dict(src.post_layernorm.state_dict())
