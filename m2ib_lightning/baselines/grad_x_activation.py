"""Gradient x activation on a block's tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backbones.base import block_output
from ..engine import minmax
from .base import AttributionMethod, Maps, _block_input, _hooked, _leaf, _replace_hidden, register_method


@register_method
class GradXActivation(AttributionMethod):
    """Gradient x activation (Shrikumar et al., 2016). Image: on the tokens leaving vision block ``layer`` (default the penultimate: after the last block only the pooled token reaches the score; Captum
    ``LayerGradientXActivation``), summed over channels, ReLU, per patch. Text: gradient x token embedding entering
    the first text block, |summed over channels|."""

    name = "grad_x_activation"
    has_text_map = True

    def __init__(self, backbone: Any, layer: int = -2):
        super().__init__(backbone)
        self.layer = layer

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        from captum.attr import LayerGradientXActivation

        block = self.backbone.blocks("image")[self.layer]
        tokens = LayerGradientXActivation(self.image_score(input_ids, attention_mask), block).attribute(_leaf(pixel_values))
        image = self.token_map(block_output(tokens).sum(-1).clamp_min(0), pixel_values)
        return Maps(image, self._text(pixel_values, input_ids, attention_mask))

    def _text(self, pixel_values, input_ids, attention_mask) -> Tensor:
        score = self.text_score(pixel_values, attention_mask)
        captured: dict[str, Tensor] = {}

        def leaf(module, args, kwargs):
            captured["hidden"] = _block_input(args, kwargs).detach().requires_grad_()
            return _replace_hidden(args, kwargs, captured["hidden"])

        with _hooked(self.backbone.blocks("text")[0], pre=leaf):
            scores = score(input_ids)
        hidden = captured["hidden"]
        (grads,) = torch.autograd.grad(scores.sum(), [hidden])
        attribution = (grads * hidden).sum(-1).abs()
        return minmax(self.scorer.text_columns(attribution, pixel_values, input_ids, attention_mask), attention_mask.bool())
