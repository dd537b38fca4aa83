"""The small CLIP of the shapes world: its tokenizer, its config, and loading any CLIP by name or path.

The shipped model is saved in exactly the layout a user downloads from a model
hub (config, safetensors weights, tokenizer files, image processor config), so
``load_clip("builtin:shapes-clip")`` and ``load_clip("openai/clip-vit-base-patch32")``
go through the same ``from_pretrained`` code.
"""

from __future__ import annotations

from pathlib import Path

from ..data.world import vocabulary

#: Where the shipped model lives inside the package.
SHIPPED_MODELS = {"shapes-clip": Path(__file__).resolve().parent.parent / "assets" / "shapes-clip"}
BUILTIN_PREFIX = "builtin:"

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def resolve_model_path(name_or_path: str) -> str:
    """``builtin:NAME`` names a model shipped in the package; anything else goes to ``from_pretrained`` as it is."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name not in SHIPPED_MODELS:
            raise ValueError(f"model.name_or_path={name_or_path!r}: no shipped model {name!r}; have {sorted(SHIPPED_MODELS)}")
        path = SHIPPED_MODELS[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the shipped model {name!r} is missing from {path}; train it with configs/fit_shapes_clip.yaml")
        return str(path)
    return name_or_path


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


def load_clip(name_or_path: str):
    """``CLIPModel`` and ``AutoProcessor`` from a hub name, a local directory or ``builtin:NAME``.

    Raises instead of returning a model whose tokenizer came back empty (which
    ``from_pretrained`` can do offline without an error).
    """
    from transformers import AutoProcessor, CLIPModel

    path = resolve_model_path(name_or_path)
    model = CLIPModel.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or len(tokenizer) == 0 or tokenizer.eos_token_id is None:
        raise RuntimeError(f"the tokenizer of {name_or_path!r} loaded empty (offline without a cached copy?)")
    if tokenizer.eos_token_id != model.config.text_config.eos_token_id and model.config.text_config.eos_token_id != 2:
        raise RuntimeError(
            f"tokenizer EOS id {tokenizer.eos_token_id} differs from the model's eos_token_id "
            f"{model.config.text_config.eos_token_id}: the text tower would pool at the wrong token"
        )
    return model.eval(), processor
