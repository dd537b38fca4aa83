"""M2IB at the cost of one forward pass: an :class:`ExplainerNetwork` over the frozen backbone's features, with the
front door of :class:`~m2ib_lightning.engine.M2IB` (``screen``, ``attribute``) and its result type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..backbones import MODALITIES, Modality, as_backbone, resolve_layer
from ..backbones.base import tower_inputs
from ..engine import AttributionResult, M2IBConfig, eval_mode, image_maps_from_capacity, minmax, screen
from ..engine.inputs import _check_inputs
from .network import IMITATED_SETTINGS, LOG_EPSILON, ExplainerConfig, ExplainerNetwork, backbone_fingerprint


def tower_features(backbone: Any, layers: dict[Modality, int], pixel_values: Tensor, input_ids: Tensor,
                   attention_mask: Tensor) -> tuple[dict[Modality, Any], dict[Modality, Tensor]]:
    """Per tower, the state at the bottleneck's block and the embedding: one forward pass of each tower."""
    states, embeddings = {}, {}
    for m in MODALITIES:
        inputs = tower_inputs(m, pixel_values, input_ids, attention_mask)
        states[m] = backbone.prefix(m, inputs, layers[m])
        embeddings[m] = backbone.tail(m, states[m].hidden, states[m])
    return states, embeddings


def capacity_of(log_capacity: Tensor, token_mask: Tensor) -> Tensor:
    """Predicted log(capacity + LOG_EPSILON) back to nats, zero at padding (as the exact fit's)."""
    return (log_capacity.exp() - LOG_EPSILON).clamp_min(0).masked_fill(~token_mask, 0)


def new_explainer(model: Any, m2ib: M2IBConfig, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                  *, width: int = 128, depth: int = 2, heads: int = 4, name: str = "", seed: int = 0) -> ExplainerNetwork:
    """An untrained explainer for ``model`` (its fingerprint, its towers' widths read off one forward pass of the
    example inputs) that is to imitate the exact fit at ``m2ib``; ``name`` is the backbone's, for messages; its
    initial weights come from ``seed`` alone (the global random state is left as it was)."""
    backbone = as_backbone(model)
    layers = {m: resolve_layer(m2ib.layer(m), backbone.num_layers(m), f"{m} layer") for m in MODALITIES}
    pixel_values, input_ids, attention_mask = _check_inputs(pixel_values, input_ids, attention_mask)
    with torch.no_grad(), eval_mode(backbone.module):
        states, embeddings = tower_features(backbone, layers, pixel_values, input_ids, attention_mask)
    config = ExplainerConfig(
        backbone=name or type(backbone.module).__name__, fingerprint=backbone_fingerprint(backbone.module),
        m2ib={k: getattr(m2ib, k) for k in IMITATED_SETTINGS}, feature_dims={m: int(states[m].hidden.shape[-1]) for m in MODALITIES},
        embed_dim=int(embeddings["image"].shape[-1]), width=width, depth=depth, heads=heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ExplainerNetwork(config)


class AmortisedM2IB:
    """M2IB's maps predicted in one forward pass by an explainer trained on exact fits (``configs/fit_explainer.yaml``).

    >>> explainer = AmortisedM2IB(clip_model, "builtin:shapes-clip-amortised")
    >>> result = explainer.attribute(pixel_values, input_ids, attention_mask)

    The explainer refuses a backbone other than the one it was trained for, and, given ``m2ib``, exact-fit
    settings other than those it imitates; ``m2ib.precision="bf16"`` runs the backbone and the network under
    bfloat16 autocast (about twice the pairs/s on CPUs with bf16 units). ``seed`` is accepted (and ignored) so it stands where
    :class:`~m2ib_lightning.engine.M2IB` does: the prediction draws no noise.
    """

    def __init__(self, model: Any, explainer: str | Path | ExplainerNetwork, *, m2ib: M2IBConfig | None = None,
                 adapter: str = "auto"):
        self.backbone = as_backbone(model, adapter)
        self.network = explainer if isinstance(explainer, ExplainerNetwork) else ExplainerNetwork.from_pretrained(explainer)
        self.network.check_backbone(self.backbone.module, None if m2ib is None else vars(m2ib))
        self.config = m2ib or M2IBConfig(**self.network.config.m2ib)
        self.layers: dict[Modality, int] = {
            m: resolve_layer(self.config.layer(m), self.backbone.num_layers(m), f"{m} layer") for m in MODALITIES
        }

    def screen(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[str | None]:
        return screen(self.backbone, pixel_values, input_ids, attention_mask)

    @torch.no_grad()
    def attribute(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, seed: Any = None
                  ) -> AttributionResult:
        pixel_values, input_ids, attention_mask = _check_inputs(pixel_values, input_ids, attention_mask)
        parameter = next(self.backbone.module.parameters())
        pixel_values = pixel_values.to(parameter.device, parameter.dtype)
        input_ids, attention_mask = input_ids.to(parameter.device), attention_mask.to(parameter.device)
        self.network.to(parameter.device)  # where the backbone is now (a no-op once it is there)
        self.backbone.validate_inputs(pixel_values, input_ids, attention_mask)
        bf16 = torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")
        with eval_mode(self.backbone.module), eval_mode(self.network), bf16:
            states, embeddings = tower_features(self.backbone, self.layers, pixel_values, input_ids, attention_mask)
            masks = {m: states[m].token_mask.bool() for m in MODALITIES}
            logs = {m: log.float() for m, log in self.network({m: states[m].hidden for m in MODALITIES}, masks, embeddings).items()}
        image, text = (capacity_of(logs[m], masks[m]) for m in MODALITIES)
        grid = self.backbone.patch_grid(pixel_values)
        nan = torch.full((pixel_values.shape[0],), float("nan"), device=image.device)  # no fit was run
        return AttributionResult(
            image_maps=image_maps_from_capacity(image, grid, tuple(pixel_values.shape[-2:])),
            text_maps=minmax(text, attention_mask.bool()),
            image_capacity=image, text_capacity=text, patch_grid=grid, image_fit=nan, text_fit=nan,
        )
