"""Which adapter a probe talks to: the model family's own (its ``probing`` capability), or a user's.

A *site* is an activation of shape (N, T, D) in one layer: a module's output
(its first element, if it returns a tuple) or a module's first input. Head
sites split D into ``heads`` equal slices: head h is dimensions
[h*d, (h+1)*d) of the context vectors *before* the output projection, the only
place where one head's contribution is separable.

The patching engine only talks to the ``probing`` capability
(:class:`~m2ib_lightning.backbones.capabilities.Probing`). The family adapters
that attribution uses declare their sites (CLIP: ``hf_clip``; BLIP VQA:
``hf_blip_vqa``), so a model is probed through the same adapter it is
attributed with. For a model no family adapter serves, subclass
:class:`ProbingAdapter` and pass it, or register it with
:func:`register_probing_adapter`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ..backbones.capabilities import Probing, Site, require
from ..backbones.registry import UnknownAdapterError, as_backbone
from ..registry import Registry

__all__ = ["ProbingAdapter", "Site", "as_probing_adapter", "register_probing_adapter", "PROBING_ADAPTERS"]


class ProbingAdapter:
    """A base for a user's probing adapter: the members of the ``probing`` capability.

    ``probe_towers`` are the encoders whose sites can be patched; ``decision_logits``
    runs the model on one input repeated ``rows`` times and returns (rows, C)
    logits, from which ``answers`` = (correct, incorrect) pick two columns.
    """

    capabilities = ("probing",)
    module: nn.Module
    probe_towers: tuple[str, ...] = ()

    def default_probe_tower(self, modality: str) -> str:
        raise NotImplementedError

    def probe_sites(self, tower: str) -> tuple[str, ...]:
        raise NotImplementedError

    def probe_layers(self, tower: str) -> int:
        raise NotImplementedError

    def probe_site(self, tower: str, name: str, layer: int) -> Site:
        raise NotImplementedError

    def decision_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, modality: str) -> dict:
        raise NotImplementedError

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        raise NotImplementedError

    def pooled_position(self, tower: str, inputs: dict[str, Tensor]) -> int:
        raise ValueError(f"{type(self).__name__} has no pooled position for tower {tower!r}")

    def head_attention(self, tower: str, inputs: dict[str, Tensor]) -> list[Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not expose its attention probabilities")


#: name -> (accepts(model), adapter factory) for models no family adapter serves; the latest registered is tried first
PROBING_ADAPTERS: Registry[tuple[Callable[[Any], bool], Callable[[Any], Probing]]] = Registry("probing adapter")


def register_probing_adapter(name: str, accepts: Callable[[Any], bool], factory: Callable[[Any], Probing], *,
                             overwrite: bool = False) -> None:
    """Make ``ActivationPatching(model)`` find ``factory`` for models ``accepts`` says yes to (tried before those
    registered earlier, and before the family adapters)."""
    PROBING_ADAPTERS.register(name, (accepts, factory), overwrite=overwrite)


def as_probing_adapter(model: Any) -> Probing:
    """``model`` itself if it is a probing adapter; else a registered probing adapter that accepts it; else its
    family adapter, which must offer the ``probing`` capability."""
    if not isinstance(model, nn.Module):  # an adapter already
        require(model, "probing", "activation patching")
        return model
    for accepts, factory in reversed(list(PROBING_ADAPTERS.values())):
        if accepts(model):
            adapter = factory(model)
            require(adapter, "probing", f"probing adapter {type(adapter).__name__}")
            return adapter
    try:
        adapter = as_backbone(model)
    except UnknownAdapterError as err:
        raise TypeError(
            f"no adapter probes a {type(model).__name__}: pass a transformers.BlipForQuestionAnswering or CLIPModel, "
            "a ProbingAdapter (m2ib_lightning.probing.adapters), or register one with register_probing_adapter"
        ) from err
    require(adapter, "probing", "activation patching")
    return adapter
