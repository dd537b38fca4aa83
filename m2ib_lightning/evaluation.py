"""Scoring attribution methods against each other: per-sample metric values (pure torch; the run's
LightningModule is :class:`m2ib_lightning.modules.EvaluationModule`).

For each method and sample: image confidence drop and increase, image deletion and
insertion AUC, and, where the data has ground truth, pointing game, energy in the mask
and top-k IoU; for methods with text maps, text confidence drop and increase and text
deletion and insertion AUC. See ``m2ib_lightning.metrics`` for every definition.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .baselines import Maps, replacement_token, scorer_of
from .metrics import (
    METRICS, ConfidenceDrop, PointingGame, TopKIoU, confidence_drop, confidence_increase, curve_auc, keep_image, keep_text,
    mask_energy, metric_label, perturbation_curve, pointing_game, text_perturbation_curve, top_k_iou,
)
from .metrics.mean import MeanOverSamples
from .metrics.settings import MetricSettings

#: the table's columns: every registered metric, and next to the pointing game its mean over classes (``metrics.classes``)
CLASS_MEAN = "pointing_game_class_mean"
COLUMNS = (*list(METRICS)[:5], CLASS_MEAN, *list(METRICS)[5:])


def column_label(name: str) -> str:
    return f"{PointingGame.label} (class mean)" if name == CLASS_MEAN else metric_label(name)


def higher_is_better(name: str) -> bool:
    return (PointingGame if name == CLASS_MEAN else METRICS[name]).higher_is_better


LOCALISATION = ("pointing_game", "energy", "top_k_iou")


def metric_of(name: str, settings: MetricSettings) -> MeanOverSamples:
    """The torchmetrics metric of a table column, with the settings that define it."""
    if name == "top_k_iou":
        return TopKIoU(settings.top_k_fraction)
    if name == "pointing_game":
        return PointingGame(ties=settings.pointing_ties, tolerance=settings.pointing_tolerance,
                            num_classes=len(settings.classes) if settings.classes else None)
    if name.endswith("confidence_drop"):
        return ConfidenceDrop(relative=settings.confidence_drop == "relative")
    return METRICS[name]()


class Evaluator:
    """Per-sample metric values of a method's maps for a batch (no state; torchmetrics classes aggregate them)."""

    def __init__(self, backbone: Any, settings: MetricSettings = MetricSettings()):
        self.scorer = scorer_of(backbone)
        self.settings = settings
        self.replacement: int | None = None  # known once a batch has text maps (an adapter may serve no tokenizer)

    def replacement_id(self) -> int:
        if self.replacement is None:
            self.replacement = replacement_token(self.scorer.backbone, self.settings.replacement_id)
        return self.replacement

    def values(self, maps: Maps, batch: dict[str, Any], clean: Tensor, words: Tensor) -> dict[str, Tensor]:
        px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        s = self.settings
        unit = s.unit or px.shape[-2] // self.scorer.backbone.patch_grid(px)[0]
        confidence = self.scorer.confidence  # the cosine, or the answer's probability
        image_score = _composed(confidence, self.scorer.image_score(ids, mask))
        clean = confidence(clean)
        with torch.no_grad():
            kept = image_score(keep_image(px, maps.image))
        relative = s.confidence_drop == "relative"
        out = {
            "image_confidence_drop": confidence_drop(clean, kept, relative),
            "image_confidence_increase": confidence_increase(clean, kept),
            "image_deletion_auc": curve_auc(perturbation_curve(
                image_score, px, maps.image, mode="deletion", steps=s.steps, unit=unit, baseline=s.deletion_baseline)),
            "image_insertion_auc": curve_auc(perturbation_curve(
                image_score, px, maps.image, mode="insertion", steps=s.steps, unit=unit, baseline=s.insertion_baseline)),
        }
        if "target_mask" in batch:  # NaN for samples without ground truth
            rows = batch["has_target"].to(px.device)
            target, image = batch["target_mask"][rows], maps.image[rows]
            pointing = pointing_game(image, target, ties=s.pointing_ties, tolerance=s.pointing_tolerance)
            for name, value in (("pointing_game", pointing), ("energy", mask_energy(image, target)),
                                ("top_k_iou", top_k_iou(image, target, s.top_k_fraction))):
                out[name] = torch.full((len(rows),), float("nan"), device=px.device).masked_scatter(rows, value.float())
        if maps.text is not None:
            text_score = _composed(confidence, self.scorer.text_score(px, mask))
            replacement = self.replacement_id()
            with torch.no_grad():
                kept = text_score(keep_text(ids, maps.text, words, replacement))
            out["text_confidence_drop"] = confidence_drop(clean, kept, relative)
            out["text_confidence_increase"] = confidence_increase(clean, kept)
            for mode in ("deletion", "insertion"):
                curve = text_perturbation_curve(text_score, ids, maps.text, words, replacement, mode=mode, steps=s.steps)
                out[f"text_{mode}_auc"] = curve_auc(curve)
        return out


def _composed(outer: Any, inner: Any) -> Any:
    return lambda x: outer(inner(x))
