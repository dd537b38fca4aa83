"""Loading a model and its processor by hub name, local directory, or ``builtin:NAME`` (a model shipped in the package)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "shapes" / "assets"
#: name -> (directory, the config that trains it)
SHIPPED_MODELS = {
    "shapes-clip": (ASSETS / "shapes-clip", "configs/fit_shapes_clip.yaml"),
    "shapes-blip-vqa": (ASSETS / "shapes-blip-vqa", "configs/fit_shapes_vqa.yaml"),
    "shapes-llava": (ASSETS / "shapes-llava", "configs/fit_shapes_llava.yaml, then configs/fit_shapes_llava_stage2.yaml"),
}
BUILTIN_PREFIX = "builtin:"


def resolve_model_path(name_or_path: str) -> str:
    """``builtin:NAME`` names a model shipped in the package; anything else goes to ``from_pretrained`` as it is."""
    return resolve_shipped(name_or_path, SHIPPED_MODELS, "model")


def resolve_shipped(name_or_path: str, shipped: dict[str, tuple[Path, str]], what: str) -> str:
    """The directory of ``builtin:NAME`` among ``shipped`` ({name: (directory, the config that trains it)}), or
    ``name_or_path`` as it is."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in shipped:
        raise ValueError(f"{name_or_path!r}: no shipped {what} {name!r}; have {sorted(shipped)}")
    path, recipe = shipped[name]
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the shipped {what} {name!r} is missing from {path}; train it with {recipe}")
    return str(path)


@dataclass(frozen=True)
class HubOptions:
    """How ``from_pretrained`` loads a checkpoint on a cluster: a pinned ``revision`` (branch, tag or commit),
    the weights' ``dtype`` (float32, bfloat16, float16 or auto), the ``attn_implementation`` (eager, sdpa, ...),
    ``local_files_only`` (never ask the hub), and ``trust_remote_code`` (off unless asked: it runs the
    checkpoint's own Python code)."""

    revision: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    local_files_only: bool = False
    trust_remote_code: bool = False

    def common(self) -> dict[str, Any]:
        """What the config, the model and the processor all take."""
        out: dict[str, Any] = {"local_files_only": self.local_files_only, "trust_remote_code": self.trust_remote_code}
        if self.revision is not None:
            out["revision"] = self.revision
        return out

    def model(self) -> dict[str, Any]:
        out = self.common()
        if self.dtype is not None:
            import torch
            import transformers

            dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
            out["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
        if self.attn_implementation is not None:
            out["attn_implementation"] = self.attn_implementation
        return out


DTYPES = ("float32", "bfloat16", "float16", "auto")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def check_checkpoint_files(name_or_path: str) -> None:
    """A local checkpoint directory has what loading needs; each missing part is named (hub names pass)."""
    path = Path(resolve_model_path(name_or_path)).expanduser()
    if not _looks_local(str(path)):
        return
    if not path.exists():
        raise FileNotFoundError(f"{name_or_path!r} does not exist (neither a local directory nor a hub name)")
    if not path.is_dir():
        raise NotADirectoryError(f"{name_or_path!r} is a file; a checkpoint is a directory in the hub layout")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path!r} has no config.json: not a checkpoint directory in the hub layout")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{name_or_path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "save it with processor.save_pretrained(...)")
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise FileNotFoundError(f"{name_or_path!r} has no image processor config (preprocessor_config.json)")


def read_model_config(name_or_path: str, hub: HubOptions | None = None) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (local directories are read directly, hub names via transformers)."""
    check_checkpoint_files(name_or_path)
    path = Path(resolve_model_path(name_or_path)).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), **(hub or HubOptions()).common()).to_dict()


def load_pretrained(model_class: Any, name_or_path: str, hub: HubOptions | None = None,
                    processor_class: Any = None) -> tuple[Any, Any]:
    """``model_class.from_pretrained`` and ``AutoProcessor.from_pretrained`` (or ``processor_class``'s) of one
    checkpoint, model in eval mode.

    Raises instead of returning a processor whose tokenizer came back empty
    (which ``from_pretrained`` can do offline without an error).
    """
    from transformers import AutoProcessor

    hub = hub or HubOptions()
    check_checkpoint_files(name_or_path)
    path = str(Path(resolve_model_path(name_or_path)).expanduser())
    model = model_class.from_pretrained(path, **hub.model())
    processor = (processor_class or AutoProcessor).from_pretrained(path, **hub.common())
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or len(tokenizer) == 0 or (tokenizer.eos_token_id is None and tokenizer.sep_token_id is None):
        raise RuntimeError(f"the tokenizer of {name_or_path!r} loaded empty (offline without a cached copy?)")
    if getattr(processor, "image_processor", None) is None:
        raise RuntimeError(f"{name_or_path!r} has no image processor config (preprocessor_config.json)")
    return model.eval(), processor
