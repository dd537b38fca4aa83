"""The small CLIP of the shapes world: its tokenizer, image processor and config.

The shipped model is saved in exactly the layout a user downloads from a model
hub (config, safetensors weights, tokenizer files, image processor config), so
``load_backbone("builtin:shapes-clip")`` and ``load_backbone("openai/clip-vit-base-patch32")``
go through the same ``from_pretrained`` code.
"""

from __future__ import annotations

from ..world import vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(max_length: int = 16):
    """A word-level tokenizer over the world's vocabulary (pad 0, BOS and EOS last, so EOS is never id 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [PAD, UNK, *vocabulary(), BOS, EOS]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def build_image_processor(image_size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def build_shapes_clip(
    tokenizer,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    layers: int = 4,
    heads: int = 4,
    projection_dim: int = 128,
    seed: int = 0,
):
    """A freshly initialised ``transformers.CLIPModel`` sized for the shapes world."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    config = CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(**tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)
