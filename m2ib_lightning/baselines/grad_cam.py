"""Grad-CAM (Selvaraju et al., 2017) on a vision block's tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backbones.base import block_output
from ..engine import image_maps_from_capacity
from .base import AttributionMethod, Maps, _hooked, _leaf, register_method


@register_method
class GradCAM(AttributionMethod):
    """Grad-CAM (Selvaraju et al., 2017) on the patch tokens leaving vision block ``layer`` (default the penultimate): channel weights are the
    gradients averaged over patches, the map is ReLU(sum_c w_c A_tc). Written out because Captum's ``LayerGradCam``
    takes channels at dimension 1 (CNN layout), where a ViT block has tokens."""

    name = "grad_cam"

    def __init__(self, backbone: Any, layer: int = -2):
        super().__init__(backbone)
        self.layer = layer

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        score = self.image_score(input_ids, attention_mask)
        captured: dict[str, Tensor] = {}

        def keep(module, args, output):
            captured["tokens"] = block_output(output)

        with _hooked(self.backbone.blocks("image")[self.layer], post=keep):
            scores = score(_leaf(pixel_values))  # a leaf: a frozen model (requires_grad off) still has a graph
        tokens = captured["tokens"]
        (grads,) = torch.autograd.grad(scores.sum(), [tokens])
        grads, tokens = self.patch_tokens(grads, pixel_values), self.patch_tokens(tokens, pixel_values)
        cam = (grads.mean(1, keepdim=True) * tokens).sum(-1).clamp_min(0)
        return Maps(image_maps_from_capacity(cam, self.backbone.patch_grid(pixel_values), tuple(pixel_values.shape[-2:])))
