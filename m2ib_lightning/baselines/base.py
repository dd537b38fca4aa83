"""What every attribution method shares: the maps it returns, the registry it is picked from, the method frame
(the adapter, the score it explains, eval mode with gradients on), and hooks that are always removed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from ..engine import eval_mode, image_maps_from_capacity
from ..registry import Registry
from .scoring import scorer_of
from .tokens import special_tokens


@dataclass
class Maps:
    """A method's maps for a batch: image (B, H, W) and text (B, L) or None, each in [0, 1]."""

    image: Tensor
    text: Tensor | None = None
    #: rows the method has no maps for (maps made elsewhere that lack an id), with the reason; their maps are NaN
    missing: dict[int, str] = field(default_factory=dict)


METHODS: Registry[type["AttributionMethod"]] = Registry("attribution method")


def register_method(cls: type["AttributionMethod"] | None = None, *, overwrite: bool = False) -> Any:
    """Class decorator: make a method available by its ``name`` (in configs: ``methods: [...]``); a taken name
    is refused unless ``@register_method(overwrite=True)``."""
    if cls is None:
        return lambda method: register_method(method, overwrite=overwrite)
    return METHODS.register(cls.name, cls, overwrite=overwrite)


def make_method(name: str, backbone: Any, **settings: Any) -> "AttributionMethod":
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; registered: {sorted(METHODS)}")
    return METHODS.create(name, backbone, **settings)


@contextlib.contextmanager
def _hooked(module: torch.nn.Module, *, pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
    handles = []
    try:
        if pre is not None:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            handles.append(module.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _leaf(pixel_values: Tensor) -> Tensor:
    """Pixels as a leaf that requires gradients, as Captum wants its inputs (the caller's tensor is left alone)."""
    return pixel_values.detach().clone().requires_grad_()


def _replace_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    """A block's inputs with its hidden states (first positional or ``hidden_states``) replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class AttributionMethod:
    """A method's common frame: the adapter, the score (:func:`scorer_of`), and eval mode with gradients on during
    ``attribute``."""

    name: ClassVar[str] = "method"
    has_text_map: ClassVar[bool] = False

    def __init__(self, backbone: Any, **settings: Any):
        self.scorer = scorer_of(backbone)
        self.backbone = self.scorer.backbone
        if settings:
            raise TypeError(f"method {self.name!r} takes no settings {sorted(settings)}")

    def image_score(self, input_ids: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        return self.scorer.image_score(input_ids, attention_mask)

    def text_score(self, pixel_values: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        return self.scorer.text_score(pixel_values, attention_mask)

    def attribute(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor, special: Tensor | None = None,
        answers: tuple[Tensor, Tensor] | None = None, ids: list[str] | None = None,
    ) -> Maps:
        """Maps for a batch. ``seeds`` (B,) seed the methods that draw random numbers, per sample; ``special``
        (B, L) marks BOS/EOS/CLS/SEP/padding (default: the adapter's ``special_mask``; for a question, every token
        that is not one of its words); ``answers`` (answer_ids, answer_mask), for a VLM that answers; ``ids`` the
        samples' ids (what maps made elsewhere are keyed by)."""
        if answers is not None:
            self.scorer.bind(*answers)
        if special is None:
            special = special_tokens(self.backbone, input_ids)
        self.words = attention_mask.bool() & ~special.to(attention_mask.device)
        with eval_mode(self.backbone.module), torch.enable_grad():
            maps = self._maps(pixel_values, input_ids, attention_mask, seeds)
        return Maps(maps.image.detach(), None if maps.text is None else maps.text.detach())

    def _maps(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor) -> Maps:
        """The method itself; ``self.words`` (B, L) marks the caption's words (real tokens, not special)."""
        raise NotImplementedError

    def patch_tokens(self, tokens: Tensor, pixel_values: Tensor) -> Tensor:
        """A vision block's per-token values as the block gives them ((B, T, ...), or packed) -> (B, rows * cols, ...)
        in raster order: prefix tokens dropped, or the adapter's own ``raster_patches`` (Qwen2-VL's window order)."""
        own = getattr(self.backbone, "raster_patches", None)
        return own(tokens, pixel_values) if own is not None else tokens[:, self.backbone.num_prefix_tokens:]

    def token_map(self, tokens: Tensor, pixel_values: Tensor) -> Tensor:
        """Per-token values of the image tower (B, T) -> image map (B, H, W) through the patch grid."""
        patches = self.patch_tokens(tokens, pixel_values)
        return image_maps_from_capacity(patches, self.backbone.patch_grid(pixel_values), tuple(pixel_values.shape[-2:]))
