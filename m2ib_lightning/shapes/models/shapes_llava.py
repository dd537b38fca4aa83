"""The small LLaVA of the shapes world: a word-level tokenizer with a chat template, the processor, and the model.

It is a plain ``transformers.LlavaForConditionalGeneration`` (a CLIP vision tower that
starts from the shipped shapes CLIP, LLaVA's two-layer projector, a small Llama),
saved in the hub layout with its ``LlavaProcessor``, so
``from_pretrained("builtin:shapes-llava")`` goes through the same code as a
downloaded LLaVA-1.5: the processor expands ``<image>`` to one token per image
feature, and the chat template writes ``<s>user: <image> QUESTION assistant:``.
Answers are one word followed by ``</s>``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..questions import vqa_vocabulary
from .shapes_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
ROLE_WORDS = ("user", "assistant", ":")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_llava_tokenizer(max_length: int = 128):
    """A lower-casing word-level tokenizer over the world's words and the chat roles; ``<s>``/``</s>`` are BOS/EOS,
    ``<image>`` the image placeholder. Nothing is added automatically: the chat template writes ``<s>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, BOS, EOS, IMAGE]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *ROLE_WORDS, *vqa_vocabulary()]))}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "circle?" -> "circle", "?"; "user:" -> "user", ":"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=max_length, padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_llava_processor(tokenizer: Any, image_size: int, patch_size: int):
    """``LlavaProcessor`` with a CLIP image processor at the world's size (CLS is a vision token; LLaVA drops it)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def prompt_text(question: str) -> str:
    """The chat prompt of one question, as the processor's template writes it (before ``<image>`` is expanded)."""
    return f"{BOS}user: {IMAGE} {question} assistant:"


def build_shapes_llava(
    tokenizer: Any,
    vision_config: dict,
    *,
    width: int = 128,
    layers: int = 4,
    heads: int = 4,
    vision_feature_layer: int = -2,
    seed: int = 0,
) -> nn.Module:
    """A freshly initialised ``LlavaForConditionalGeneration``: ``vision_config`` (a CLIP vision config as a dict)
    and a Llama of ``layers`` blocks over ``tokenizer``'s words."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    patches = (vision_config["image_size"] // vision_config["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config={**vision_config, "model_type": "clip_vision_model"},
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3 * width,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=tokenizer.model_max_length, rms_norm_eps=1e-5, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=patches,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


#: the parameter-name prefix of the vision tower (its learning-rate group)
VISION_TOWER = "model.vision_tower."


def set_vision_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze the vision tower (as LLaVA-1.5 does) or let it train."""
    model.model.vision_tower.requires_grad_(trainable)


def init_vision_from_clip(model: nn.Module, clip: nn.Module) -> None:
    """Copy a ``CLIPModel``'s vision tower into the LLaVA's (same shape; transformers 4.x nests one more level)."""
    tower = model.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(clip.vision_model.state_dict())
