"""The front door: :class:`M2IB` and :func:`attribute`."""


from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backbones import MODALITIES, Modality, as_backbone, resolve_layer
from ..backbones.base import other, tower_inputs
from ..backbones.capabilities import claimed
from .config import M2IBConfig, Seeds
from .inputs import _as_seeds, _check_inputs, screen
from .maps import image_maps_from_capacity, minmax
from .objective import eval_mode, fit_tower
from .result import AttributionResult, TowerFit



class M2IB:
    """Multi-modal information bottleneck attribution (Wang et al., NeurIPS 2023).

    >>> explainer = M2IB(clip_model, M2IBConfig(vision_layer=9, text_layer=9))
    >>> result = explainer.attribute(pixel_values, input_ids, attention_mask, seed=0)
    """

    def __init__(self, model: Any, config: M2IBConfig | None = None, *, adapter: str = "auto"):
        self.backbone = as_backbone(model, adapter)
        self.config = config or M2IBConfig()
        #: the block of each tower, negative indices resolved
        self.layers: dict[Modality, int] = {
            m: resolve_layer(
                self.config.layer(m), self.backbone.num_layers(m), "vision_layer" if m == "image" else "text_layer", f"the {m} tower"
            )
            for m in MODALITIES
        }

    @property
    def device(self) -> torch.device:
        return next(self.backbone.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.module.parameters()).dtype

    def screen(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[str | None]:
        """Per sample, why :meth:`attribute` would refuse it (non-finite pixels, no end-of-text token, too long, ...), or None.

        Lets a dataset run attribute the good samples of a batch and record the others.
        """
        return screen(self.backbone, pixel_values, input_ids, attention_mask)

    def attribute(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, seed: Seeds = 0
    ) -> AttributionResult:
        """Fit both bottlenecks for every pair of the batch and return their maps."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "M2IB needs gradients but runs under torch.inference_mode(); "
                "in Lightning use Trainer(inference_mode=False)"
            )
        pixel_values, input_ids, attention_mask = _check_inputs(pixel_values, input_ids, attention_mask)
        seeds = _as_seeds(seed, pixel_values.shape[0])
        pixel_values = pixel_values.to(self.device, self.dtype)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        self.backbone.validate_inputs(pixel_values, input_ids, attention_mask)

        with eval_mode(self.backbone.module):
            if self.config.batch_invariant:
                # Each sample alone, its text cut after its last real token: the shapes of its solo run.
                extents = attention_mask.shape[1] - attention_mask.flip(1).argmax(1)
                parts = [
                    self._fit(pixel_values[b : b + 1], input_ids[b : b + 1, :n], attention_mask[b : b + 1, :n], seeds[b : b + 1])
                    for b, n in enumerate(extents.tolist())
                ]
                widths = {"image": parts[0]["image"].capacity.shape[1], "text": attention_mask.shape[1]}
                fits = {m: TowerFit.concat([p[m] for p in parts], widths[m]) for m in MODALITIES}
            else:
                fits = self._fit(pixel_values, input_ids, attention_mask, seeds)

        image, text = fits["image"], fits["text"]
        grid = self.backbone.patch_grid(pixel_values)
        return AttributionResult(
            image_maps=image_maps_from_capacity(image.capacity, grid, tuple(pixel_values.shape[-2:])),
            text_maps=minmax(text.capacity, attention_mask.bool()),
            image_capacity=image.capacity,
            text_capacity=text.capacity,
            patch_grid=grid,
            image_fit=image.fit,
            text_fit=text.fit,
            curves={
                "image/capacity": image.capacity_curve,
                "image/fit": image.fit_curve,
                "text/capacity": text.capacity_curve,
                "text/fit": text.fit_curve,
            },
        )


    def _fit(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor) -> dict[Modality, TowerFit]:
        """Both towers' fits for one group of samples, fitted together."""
        with torch.no_grad():
            inputs = {m: tower_inputs(m, pixel_values, input_ids, attention_mask) for m in MODALITIES}
            targets = {m: self.backbone.embed(m, inputs[m]) for m in MODALITIES}
            states = {m: self.backbone.prefix(m, inputs[m], self.layers[m]) for m in MODALITIES}
        with torch.enable_grad():
            return {m: fit_tower(self.backbone, m, states[m], targets[other(m)], seeds, self.config) for m in MODALITIES}


def attribute(
    model: Any,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    vision_layer: int = 9,
    text_layer: int = 9,
    beta: float = 0.1,
    steps: int = 10,
    lr: float = 1.0,
    num_noise: int = 10,
    seed: Seeds = 0,
    batch_invariant: bool = True,
    noise_device: str = "cpu",
    precision: str = "32",
    answer_ids: Tensor | None = None,
    answer_mask: Tensor | None = None,
    max_new_tokens: int = 16,
    **model_inputs: Tensor,
) -> Any:
    """M2IB image and text maps for a batch of pairs; see :class:`M2IB`.

    ``model`` is a ``transformers.CLIPModel``, ``SiglipModel`` or ``BlipForImageTextRetrieval``, any model a
    registered adapter accepts, or an adapter itself; layers may be negative (-1: the last block); ``seed`` an
    int for every sample or a 1-D tensor with one seed per sample. With one
    sample and seed ``s`` the result equals the official implementation's after
    ``torch.manual_seed(s)`` before each of its two map calls.

    For a VLM that answers questions (``transformers.LlavaForConditionalGeneration``, or an adapter with the
    ``answers`` capability) the fit term is log p(answer): ``answer_ids`` (with ``answer_mask``) are the answers
    to explain; without them, the model's own greedy answers (up to ``max_new_tokens``), kept in the result's
    ``answer_ids``. Returns an :class:`~m2ib_lightning.answers.AnswerAttribution` then. ``model_inputs``: what such a
    family needs besides, by keyword (Qwen2-VL: ``image_grid_thw``, with ``pixel_values`` as its processor packs them).
    """
    config = M2IBConfig(
        vision_layer=vision_layer, text_layer=text_layer, beta=beta, steps=steps, lr=lr, num_noise=num_noise,
        batch_invariant=batch_invariant, noise_device=noise_device, precision=precision,
    )
    adapter = as_backbone(model)
    if "answers" in claimed(adapter):
        from ..answers import attribute_answers

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if answer_ids is None:
            answer_ids, answer_mask = adapter.generate_answers(pixel_values, input_ids, mask, max_new_tokens, **model_inputs)
        return attribute_answers(adapter, pixel_values, input_ids, mask, answer_ids, answer_mask, config=config, seed=seed,
                                 **model_inputs)
    if answer_ids is not None:
        raise ValueError(f"answer_ids: {type(adapter).__name__} does not answer questions (a dual encoder); "
                         "pass answer_ids only for a VLM with the answers capability")
    if model_inputs:
        raise TypeError(f"{', '.join(model_inputs)}: a dual encoder ({type(adapter).__name__}) takes no inputs besides "
                        "pixel_values, input_ids and attention_mask")
    return M2IB(adapter, config).attribute(pixel_values, input_ids, attention_mask, seed=seed)
