"""Loading a model and its processor by hub name, local directory, or ``builtin:NAME`` (a model shipped in the package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: name -> (directory, the config that trains it)
SHIPPED_MODELS = {
    "shapes-clip": (ASSETS / "shapes-clip", "configs/fit_shapes_clip.yaml"),
    "shapes-blip-vqa": (ASSETS / "shapes-blip-vqa", "configs/fit_shapes_vqa.yaml"),
}
BUILTIN_PREFIX = "builtin:"


def resolve_model_path(name_or_path: str) -> str:
    """``builtin:NAME`` names a model shipped in the package; anything else goes to ``from_pretrained`` as it is."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in SHIPPED_MODELS:
        raise ValueError(f"model.name_or_path={name_or_path!r}: no shipped model {name!r}; have {sorted(SHIPPED_MODELS)}")
    path, recipe = SHIPPED_MODELS[name]
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the shipped model {name!r} is missing from {path}; train it with {recipe}")
    return str(path)


def read_model_config(name_or_path: str) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (local directories are read directly, hub names via transformers)."""
    path = Path(resolve_model_path(name_or_path))
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path)).to_dict()


def load_pretrained(model_class: Any, name_or_path: str) -> tuple[Any, Any]:
    """``model_class.from_pretrained`` and ``AutoProcessor.from_pretrained`` of one checkpoint, model in eval mode.

    Raises instead of returning a processor whose tokenizer came back empty
    (which ``from_pretrained`` can do offline without an error).
    """
    from transformers import AutoProcessor

    path = resolve_model_path(name_or_path)
    model = model_class.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or len(tokenizer) == 0 or (tokenizer.eos_token_id is None and tokenizer.sep_token_id is None):
        raise RuntimeError(f"the tokenizer of {name_or_path!r} loaded empty (offline without a cached copy?)")
    if getattr(processor, "image_processor", None) is None:
        raise RuntimeError(f"{name_or_path!r} has no image processor config (preprocessor_config.json)")
    return model.eval(), processor
