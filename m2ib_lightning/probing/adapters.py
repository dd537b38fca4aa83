"""Probing adapters: where each layer's sites live in a model, and the decision a patch is scored by.

A *site* is an activation of shape (N, T, D) in one layer: a module's output
(its first element, if it returns a tuple) or a module's first input. Head
sites split D into ``heads`` equal slices: head h is dimensions
[h*d, (h+1)*d) of the context vectors *before* the output projection, the only
place where one head's contribution is separable.

The patching engine only talks to this interface, so CLIP and BLIP plug in the
same way and a user's own model can follow: subclass :class:`ProbingAdapter`
and register it with :func:`register_probing_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry

from ..backbones.base import features

SITE_NAMES = ("resid", "mlp", "self_attn", "cross_attn", "self_head", "cross_head")


@dataclass(frozen=True)
class Site:
    """One layer's activation: ``module``'s output (``where="output"``) or its first input (``"input"``)."""

    module: nn.Module
    where: Literal["output", "input"]
    heads: int | None = None  # for head sites: how many heads the last dimension holds


class ProbingAdapter:
    """What the patching engine needs from a model.

    ``towers`` are the encoders whose sites can be patched; ``decision_logits``
    runs the model on one input repeated ``rows`` times and returns (rows, C)
    logits, from which ``answers`` = (correct, incorrect) pick two columns.
    """

    module: nn.Module
    towers: tuple[str, ...] = ()

    def default_tower(self, modality: str) -> str:
        raise NotImplementedError

    def sites(self, tower: str) -> tuple[str, ...]:
        raise NotImplementedError

    def num_layers(self, tower: str) -> int:
        raise NotImplementedError

    def site(self, tower: str, name: str, layer: int) -> Site:
        raise NotImplementedError

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        raise NotImplementedError

    def pooled_position(self, tower: str, inputs: dict[str, Tensor]) -> int:
        raise ValueError(f"{type(self).__name__} has no pooled position for tower {tower!r}")


# ------------------------------------------------------------------------ CLIP
class CLIPProbe(ProbingAdapter):
    """A ``transformers.CLIPModel`` as a two-choice matcher.

    ``inputs`` hold the corrupted modality's input of one sample and, under
    ``"choices"``, the other modality's two candidates: the decision logits are
    ``logit_scale * cos`` against each, so answers are (0, 1).
    """

    towers = ("image", "text")

    def __init__(self, model: nn.Module):
        from ..backbones.hf_clip import HFCLIPBackbone

        self.module = model
        self.backbone = HFCLIPBackbone(model)  # the CLIP family's layout (blocks, pooling), read once

    def _encoder(self, tower: str):
        return (self.module.vision_model if tower == "image" else self.module.text_model).encoder

    def default_tower(self, modality: str) -> str:
        return modality

    def sites(self, tower: str) -> tuple[str, ...]:
        return ("resid", "mlp", "self_attn", "self_head")

    def num_layers(self, tower: str) -> int:
        return len(self._encoder(tower).layers)

    def site(self, tower: str, name: str, layer: int) -> Site:
        block = self._encoder(tower).layers[layer]
        if name == "resid":
            return Site(block, "output")
        if name == "mlp":
            return Site(block.mlp, "output")
        if name in ("self_attn", "self_head"):
            return Site(block.self_attn.out_proj, "input", block.self_attn.num_heads if name == "self_head" else None)
        raise ValueError(f"site {name!r} is not one of CLIP's {self.sites(tower)}")

    def _embed(self, tower: str, inputs: dict[str, Tensor]) -> Tensor:
        if tower == "image":
            return features(self.module.get_image_features(pixel_values=inputs["pixel_values"]))
        return features(self.module.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        other = "text" if tower == "image" else "image"
        choices = self._embed(other, inputs["choices"])
        own = {k: v.expand(rows, *v.shape[1:]) for k, v in inputs.items() if k != "choices"}
        embedding = self._embed(tower, own)
        return self.module.logit_scale.exp() * F.normalize(embedding, dim=-1) @ F.normalize(choices, dim=-1).t()

    def pooled_position(self, tower: str, inputs: dict[str, Tensor]) -> int:
        if tower == "image":
            return 0
        return int(self.backbone.pool_index(inputs["input_ids"])[0])


# ------------------------------------------------------------------- BLIP VQA
class BlipVQAProbe(ProbingAdapter):
    """A ``transformers.BlipForQuestionAnswering``, scored by its answer decoder's first step.

    Towers: ``"text"``, the image-grounded text encoder (self-attention,
    cross-attention to the image tokens, feed-forward; post-LN, so a layer's
    output is the residual stream), and ``"vision"``, the vision tower. The
    decision logits are the decoder's vocabulary logits after one step from
    ``decoder_start_token_id``, as in NOTICE.
    """

    towers = ("text", "vision")

    def __init__(self, model: nn.Module):
        self.module = model

    def default_tower(self, modality: str) -> str:
        return "text"

    def sites(self, tower: str) -> tuple[str, ...]:
        if tower == "vision":
            return ("resid", "mlp", "self_attn", "self_head")
        return SITE_NAMES

    def _layers(self, tower: str) -> nn.ModuleList:
        return self.module.vision_model.encoder.layers if tower == "vision" else self.module.text_encoder.encoder.layer

    def num_layers(self, tower: str) -> int:
        return len(self._layers(tower))

    def site(self, tower: str, name: str, layer: int) -> Site:
        block = self._layers(tower)[layer]
        if name == "resid":
            return Site(block, "output")
        if tower == "vision":
            if name == "mlp":
                return Site(block.mlp, "output")
            if name in ("self_attn", "self_head"):
                attn = block.self_attn
                return Site(attn.projection, "input", attn.num_heads if name == "self_head" else None)
        else:
            if name == "mlp":  # the feed-forward output proper: before its residual add and LayerNorm
                return Site(block.output.dense, "output")
            if name in ("self_attn", "self_head", "cross_attn", "cross_head"):
                attention = block.attention if name.startswith("self") else block.crossattention
                heads = attention.self.num_attention_heads if name.endswith("head") else None
                return Site(attention.self, "output", heads)
        raise ValueError(f"site {name!r} is not one of the {tower} tower's {self.sites(tower)}")

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        """The vision tower runs once (its output repeated) unless its own sites are patched."""
        from ..backbones.hf_blip_vqa import first_step_logits

        expand = lambda t: t.expand(rows, *t.shape[1:])  # noqa: E731
        mask = inputs.get("attention_mask")
        if tower == "vision":
            return first_step_logits(self.module, expand(inputs["pixel_values"]), expand(inputs["input_ids"]),
                                     None if mask is None else expand(mask))
        image = expand(self.module.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state)
        return first_step_logits(self.module, None, expand(inputs["input_ids"]), None if mask is None else expand(mask),
                                 image_embeds=image)


# ------------------------------------------------------------------- registry
def _is_blip_vqa(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("vision_model", "text_encoder", "text_decoder", "decoder_start_token_id"))


def _is_clip(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("vision_model", "text_model", "visual_projection", "logit_scale"))


#: name -> (accepts(model), adapter factory); the latest registered is tried first, so a user's own wins
PROBING_ADAPTERS: Registry[tuple[Callable[[Any], bool], Callable[[Any], ProbingAdapter]]] = Registry("probing adapter")
PROBING_ADAPTERS.register("blip_vqa", (_is_blip_vqa, BlipVQAProbe))
PROBING_ADAPTERS.register("clip", (_is_clip, CLIPProbe))


def register_probing_adapter(name: str, accepts: Callable[[Any], bool], factory: Callable[[Any], ProbingAdapter], *,
                             overwrite: bool = False) -> None:
    """Make ``ActivationPatching(model)`` find ``factory`` for models ``accepts`` says yes to (tried before those
    registered earlier)."""
    PROBING_ADAPTERS.register(name, (accepts, factory), overwrite=overwrite)


def as_probing_adapter(model: Any) -> ProbingAdapter:
    if isinstance(model, ProbingAdapter):
        return model
    for accepts, factory in reversed(list(PROBING_ADAPTERS.values())):
        if accepts(model):
            return factory(model)
    raise TypeError(
        f"no probing adapter accepts a {type(model).__name__}: pass a transformers.BlipForQuestionAnswering, a "
        "CLIPModel, or a ProbingAdapter (m2ib_lightning.probing.adapters), or register one with register_probing_adapter"
    )
