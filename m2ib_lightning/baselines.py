"""Baseline image attributions for a CLIP image-text pair, to compare M2IB against.

Each explains the same score, the cosine similarity between the image's and
the caption's projected embeddings, and returns maps (B, H, W) min-maxed to
[0, 1] like M2IB's. Gradient methods come from Captum; one class per method,
one ``attribute`` call, as in Captum itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones.base import features
from .engine import eval_mode, image_maps_from_capacity, minmax


class ImageTextScore(nn.Module):
    """f(pixels) = cos(image embedding, fixed caption embedding), one value per image.

    Given k images per caption, they come grouped by sample: rows b*k .. b*k + k - 1 go with caption b.
    """

    def __init__(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor):
        super().__init__()
        self.model = model
        with torch.no_grad():
            text = features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        self.register_buffer("text", F.normalize(text, dim=-1), persistent=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        image = features(self.model.get_image_features(pixel_values=pixel_values))
        copies, rest = divmod(image.shape[0], self.text.shape[0])
        if rest:
            raise ValueError(f"{image.shape[0]} images for {self.text.shape[0]} captions")
        return (F.normalize(image, dim=-1) * self.text.repeat_interleave(copies, dim=0)).sum(-1)


class _Baseline:
    name = "baseline"

    def __init__(self, model: nn.Module):
        self.model = model

    def attribute(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with eval_mode(self.model), torch.enable_grad():
            return self._maps(ImageTextScore(self.model, input_ids, mask), pixel_values).detach()

    def _maps(self, score: ImageTextScore, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError


class GradientSaliency(_Baseline):
    """|d score / d pixel| summed over channels (Simonyan et al., 2014; Captum ``Saliency``)."""

    name = "saliency"

    def _maps(self, score: ImageTextScore, pixel_values: Tensor) -> Tensor:
        from captum.attr import Saliency

        return minmax(Saliency(score).attribute(pixel_values, abs=True).sum(1))


class IntegratedGradientsMap(_Baseline):
    """|integrated gradients| from the mean image (zero after normalisation), summed over channels."""

    name = "integrated_gradients"

    def __init__(self, model: nn.Module, steps: int = 16):
        super().__init__(model)
        self.steps = steps

    def _maps(self, score: ImageTextScore, pixel_values: Tensor) -> Tensor:
        from captum.attr import IntegratedGradients

        attributions = IntegratedGradients(score).attribute(
            pixel_values, baselines=torch.zeros_like(pixel_values), n_steps=self.steps, internal_batch_size=pixel_values.shape[0]
        )
        return minmax(attributions.abs().sum(1))


class TokenGradientXActivation(_Baseline):
    """Gradient x activation on the output of vision block ``layer``, summed over channels, per patch
    (a Grad-CAM for ViT tokens; Captum ``LayerGradientXActivation``), ReLU, upsampled like M2IB's map."""

    name = "grad_x_activation"

    def __init__(self, model: nn.Module, layer: int):
        super().__init__(model)
        self.layer = layer

    def _maps(self, score: ImageTextScore, pixel_values: Tensor) -> Tensor:
        from captum.attr import LayerGradientXActivation

        block = self.model.vision_model.encoder.layers[self.layer]
        tokens = LayerGradientXActivation(score, block).attribute(pixel_values)
        tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        patch = self.model.config.vision_config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        return image_maps_from_capacity(tokens.sum(-1).clamp_min(0), grid, tuple(pixel_values.shape[-2:]))


class RandomMap(_Baseline):
    """Uniform noise: the floor every method must beat."""

    name = "random"

    def __init__(self, model: nn.Module, seed: int = 0):
        super().__init__(model)
        self.generator = torch.Generator().manual_seed(seed)

    def _maps(self, score: ImageTextScore, pixel_values: Tensor) -> Tensor:
        b, _, h, w = pixel_values.shape
        return torch.rand(b, h, w, generator=self.generator).to(pixel_values.device)


BASELINES: dict[str, Any] = {
    cls.name: cls for cls in (GradientSaliency, IntegratedGradientsMap, TokenGradientXActivation, RandomMap)
}
