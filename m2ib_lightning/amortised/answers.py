"""M2IB for answers at the cost of one forward pass: an :class:`AnswerExplainerNetwork` over the answer model's
tokens at the two bottlenecks' blocks, read in one clean pass through the answers protocol (so every family with an
answer adapter has one), with the front door and the result type of :func:`~m2ib_lightning.answers.attribute_answers`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..answers import (
    AnswerAttribution, answer_layers, image_maps_on_pictures, patch_capacity_on_grids, replaced_output, text_by_input_column,
)
from ..backbones import MODALITIES, Modality
from ..backbones.base import AnswerBatch
from ..engine import M2IBConfig, eval_mode, minmax
from .explainer import capacity_of
from .network import IMITATED_SETTINGS, AnswerExplainerNetwork, ExplainerConfig, ExplainerNetwork, backbone_fingerprint


@dataclass
class AnswerFeatures:
    """What the network reads of one batch: per tower the bottleneck block's tokens (B, T, D) and the bottlenecked
    positions (B, T), and the text block's real positions (B, T_text)."""

    hidden: dict[Modality, Tensor]
    positions: dict[Modality, Tensor]
    context: Tensor


@torch.no_grad()
def answer_features(model: Any, batch: AnswerBatch, layers: dict[Modality, int]) -> AnswerFeatures:
    """Both bottleneck blocks' outputs in one clean teacher-forced pass (the exact fit reads the same tensors
    before its first step); the text block's real positions are its attention mask where the adapter's
    inputs have one of that layout, else the bottlenecked positions alone."""
    captured: dict[Modality, list[Tensor]] = {m: [] for m in MODALITIES}
    with contextlib.ExitStack() as stack:
        for m in MODALITIES:
            stack.enter_context(replaced_output(model.blocks(m)[layers[m]], capture=captured[m]))
        model.answer_log_likelihood(batch, 1)
    hidden = {m: model.bottleneck_tokens(m, batch, captured[m][0]) for m in MODALITIES}
    positions = {m: batch.positions[m].bool() for m in MODALITIES}
    for m in MODALITIES:
        if positions[m].shape != hidden[m].shape[:2]:
            raise RuntimeError(f"{m} positions are {tuple(positions[m].shape)}, the block output {tuple(hidden[m].shape[:2])}")
    mask = batch.inputs.get("attention_mask")
    context = mask.bool() if mask is not None and mask.shape == positions["text"].shape else positions["text"]
    return AnswerFeatures(hidden, positions, context)


def new_answer_explainer(model: Any, m2ib: M2IBConfig, batch: AnswerBatch, *, width: int = 128, depth: int = 2,
                         heads: int = 4, name: str = "", seed: int = 0) -> AnswerExplainerNetwork:
    """An untrained explainer for the answer adapter ``model`` (its fingerprint, its blocks' widths read off one
    pass of the example ``batch``) that is to imitate the exact fit at ``m2ib``; weights from ``seed`` alone."""
    layers = answer_layers(model, m2ib)
    with eval_mode(model.module):
        features = answer_features(model, batch, layers)
    config = ExplainerConfig(
        backbone=name or type(model.module).__name__, fingerprint=backbone_fingerprint(model.module),
        m2ib={k: getattr(m2ib, k) for k in IMITATED_SETTINGS},
        feature_dims={m: int(features.hidden[m].shape[-1]) for m in MODALITIES}, embed_dim=0,
        width=width, depth=depth, heads=heads, kind="answers",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AnswerExplainerNetwork(config)


class AmortisedAnswerM2IB:
    """M2IB's maps of answers predicted in one forward pass by an explainer trained on an exact ``attribute_vqa``
    run (``configs/fit_explainer.yaml`` with ``exact_run`` one such run).

    >>> explainer = AmortisedAnswerM2IB(llava_adapter, "runs/fit_explainer_llava/explainer")
    >>> result = explainer.attribute(pixel_values, input_ids, attention_mask, answer_ids, answer_mask)

    Refuses a backbone other than the one it was trained for, an explainer of pairs, and, given ``m2ib``,
    exact-fit settings other than those it imitates; ``m2ib.precision="bf16"`` runs the model and the network under
    bfloat16 autocast. ``seed`` is accepted (and ignored): the prediction draws no noise.
    """

    def __init__(self, model: Any, explainer: str | Path | ExplainerNetwork, *, m2ib: M2IBConfig | None = None):
        self.backbone = model
        self.network = explainer if isinstance(explainer, ExplainerNetwork) else ExplainerNetwork.from_pretrained(explainer)
        self.network.check_backbone(model.module, None if m2ib is None else vars(m2ib), kind="answers")
        self.config = m2ib or M2IBConfig(**self.network.config.m2ib)
        self.layers = answer_layers(model, self.config)

    def predict(self, batch: AnswerBatch) -> tuple[dict[Modality, Tensor], AnswerFeatures]:
        """Per tower the predicted log(capacity + eps) of every token of the bottleneck blocks' layouts."""
        device = batch.inputs["input_ids"].device
        self.network.to(device)  # where the backbone is (a no-op once it is there)
        bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")
        with eval_mode(self.backbone.module), eval_mode(self.network), bf16:
            features = answer_features(self.backbone, batch, self.layers)
            logs = self.network(features.hidden, features.positions, features.context)
        return {m: logs[m].float() for m in MODALITIES}, features

    @torch.no_grad()
    def attribute(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None, answer_ids: Tensor,
                  answer_mask: Tensor | None = None, *, seed: Any = None, **model_inputs: Tensor) -> AnswerAttribution:
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        answer_mask = torch.ones_like(answer_ids) if answer_mask is None else answer_mask
        batch = self.backbone.answer_batch(pixel_values, input_ids, attention_mask, answer_ids, answer_mask, **model_inputs)
        logs, features = self.predict(batch)
        image = capacity_of(logs["image"], features.positions["image"])
        text, real = text_by_input_column(batch, capacity_of(logs["text"], features.positions["text"]), tuple(input_ids.shape))
        patch_capacity = patch_capacity_on_grids(image, batch.image)
        nan = torch.full((len(input_ids),), float("nan"), device=image.device)  # no fit was run
        return AnswerAttribution(
            image_capacity=image, image_maps=image_maps_on_pictures(patch_capacity, batch.image), image_sizes=batch.image.sizes,
            image_patch_capacity=patch_capacity, text_capacity=text, text_maps=minmax(text, real), text_positions=real, image_fit=nan,
            text_fit=nan, answer_ids=answer_ids, answer_mask=answer_mask,
        )
