"""One registry of backbone adapters, read by ``as_backbone``, ``load_backbone``, ``train.py`` and every task.

An adapter is named in three ways (``model.adapter`` in a config):
``auto`` (from an in-memory model's class, or from a checkpoint's
``config.json``), a registered name (``hf_clip``, ``hf_siglip``,
``hf_blip_itc``), or a dotted path ``package.module:Factory`` to a user's own.
A factory is called as ``Factory(model, **options)`` to wrap a model and, to
load one, as ``Factory.from_pretrained(name_or_path, **options)``; ``auto``
also asks each registered factory ``accepts(model)`` and compares its
``model_types`` (and ``architectures``) with the checkpoint's config.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from ..registry import Registry
from .base import VisionLanguageBackbone
from .capabilities import Answers, check_claims
from .hf_blip import HFBlipITCBackbone
from .hf_blip_vqa import HFBlipVQAAnswerer
from .hf_clip import HFCLIPBackbone
from .hf_llava import HFLlavaAnswerer
from .hf_qwen2_vl import HFQwen2VLAnswerer
from .hf_siglip import HFSiglipBackbone
from .loading import HubOptions, read_model_config

AdapterFactory = Callable[..., VisionLanguageBackbone]

#: name -> adapter factory, in the order ``auto`` tries them
BACKBONES: Registry[AdapterFactory] = Registry("backbone adapter")
BACKBONES.register("hf_clip", HFCLIPBackbone)
BACKBONES.register("hf_siglip", HFSiglipBackbone)
BACKBONES.register("hf_blip_itc", HFBlipITCBackbone)
BACKBONES.register("hf_blip_vqa", HFBlipVQAAnswerer)
BACKBONES.register("hf_llava", HFLlavaAnswerer)
BACKBONES.register("hf_qwen2_vl", HFQwen2VLAnswerer)


class UnknownAdapterError(ValueError):
    """An adapter name, dotted path or model that no registered adapter serves."""


def register_backbone(name: str, factory: AdapterFactory, *, overwrite: bool = False) -> None:
    """Make an adapter available by name, e.g. to a config's ``model.adapter`` and to ``auto``."""
    BACKBONES.register(name, factory, overwrite=overwrite)


def _registered() -> str:
    return ", ".join(sorted(BACKBONES))


def adapter_factory(adapter: str) -> AdapterFactory:
    """The factory a registered name or a ``package.module:Factory`` path names."""
    if adapter in BACKBONES:
        return BACKBONES[adapter]
    if ":" in adapter:
        module_name, _, attribute = adapter.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UnknownAdapterError(f"adapter {adapter!r}: cannot import {module_name!r} ({err})") from err
        factory = getattr(module, attribute, None)
        if factory is None or not callable(factory):
            raise UnknownAdapterError(f"adapter {adapter!r}: {module_name!r} has no callable {attribute!r}")
        return factory
    raise UnknownAdapterError(
        f"no backbone adapter named {adapter!r}; registered adapters: {_registered()} "
        "(or 'auto', or a dotted path package.module:Factory)"
    )


def as_backbone(model: Any, adapter: str = "auto", **options: Any) -> VisionLanguageBackbone:
    """Wrap an in-memory model in its adapter; an adapter is returned as it is."""
    if isinstance(model, (VisionLanguageBackbone, Answers)) or (not isinstance(model, nn.Module) and hasattr(model, "module")):
        return _checked(model)  # an adapter already (a half-written one is refused naming what it lacks)
    if adapter != "auto":
        return _checked(adapter_factory(adapter)(model, **options))
    for factory in BACKBONES.values():
        accepts = getattr(factory, "accepts", None)
        if accepts is not None and accepts(model):
            return _checked(factory(model, **options))
    raise UnknownAdapterError(
        f"no registered backbone adapter accepts a {type(model).__name__}; registered adapters: {_registered()}. "
        "Pass an adapter (see m2ib_lightning.backbones and docs/backbones.md) or register one with register_backbone"
    )


def _checked(adapter: VisionLanguageBackbone) -> VisionLanguageBackbone:
    """The adapter, once it has every member of each capability it claims (and of the engine's towers)."""
    check_claims(adapter)
    return adapter


def adapter_for_config(config: dict[str, Any]) -> str:
    """The registered adapter whose ``model_types`` (and ``architectures``, if it names some) fit a ``config.json``."""
    model_type, architectures = config.get("model_type"), set(config.get("architectures") or ())
    for name, factory in BACKBONES.items():
        if model_type not in getattr(factory, "model_types", ()):
            continue
        wanted = set(getattr(factory, "architectures", ()))
        if not wanted or not architectures or wanted & architectures:
            return name
    raise UnknownAdapterError(
        f"no registered backbone adapter for model_type={model_type!r} (architectures {sorted(architectures)}); "
        f"registered adapters: {_registered()}. Name one with model.adapter=NAME or package.module:Factory"
    )


def load_backbone(
    name_or_path: str, adapter: str = "auto", *, hub: HubOptions | None = None, **options: Any
) -> VisionLanguageBackbone:
    """Load a checkpoint (hub name, local directory or ``builtin:NAME``) with its processor, wrapped in its adapter.

    ``hub``: revision, dtype, attention implementation, offline and remote-code settings of ``from_pretrained``
    (passed to the adapter's ``from_pretrained`` as ``hub=`` only when given).
    """
    factory = None if adapter == "auto" else adapter_factory(adapter)
    if adapter == "auto" or getattr(factory, "model_types", None):
        config = read_model_config(name_or_path, hub)
        name = adapter_for_config(config) if adapter == "auto" else adapter
        factory = adapter_factory(name)
        if config.get("model_type") not in factory.model_types:
            message = (f"adapter {name!r} serves model types {list(factory.model_types)}, but {name_or_path!r} is a "
                       f"{config.get('model_type')!r} checkpoint")
            try:
                message += f"; use model.adapter=auto or {adapter_for_config(config)!r}"
            except UnknownAdapterError:
                pass  # no registered adapter serves it
            raise UnknownAdapterError(message)
    else:
        name = adapter
    load = getattr(factory, "from_pretrained", None)
    if load is None:
        raise UnknownAdapterError(f"adapter {name!r} cannot load checkpoints: it has no from_pretrained(name_or_path)")
    return _checked(load(name_or_path, **options) if hub is None else load(name_or_path, hub=hub, **options))
