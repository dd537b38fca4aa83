"""Evaluation metrics for attribution maps: torchmetrics classes (mean and standard error, synced across
processes, each with its ``higher_is_better`` and table ``label``), their functional twins, and :data:`METRICS`,
the registry of the evaluation table's columns."""

from ..registry import Registry
from .confidence import ConfidenceDrop, ConfidenceIncrease, confidence_drop, confidence_increase, keep_image, keep_text
from .faithfulness import CurveAUC, DeletionAUC, InsertionAUC, curve_auc, perturbation_curve, text_perturbation_curve
from .localisation import MaskEnergy, PointingGame, TopKIoU, mask_energy, pointing_game, top_k_iou
from .mean import MeanOverSamples, standard_error

#: column -> metric class, in table order; a column ``image_X`` / ``text_X`` scores the image / text map
METRICS: Registry[type[MeanOverSamples]] = Registry("metric")
for _name, _metric in (
    ("image_confidence_drop", ConfidenceDrop), ("image_confidence_increase", ConfidenceIncrease),
    ("image_deletion_auc", DeletionAUC), ("image_insertion_auc", InsertionAUC),
    ("pointing_game", PointingGame), ("energy", MaskEnergy), ("top_k_iou", TopKIoU),
    ("text_confidence_drop", ConfidenceDrop), ("text_confidence_increase", ConfidenceIncrease),
    ("text_deletion_auc", DeletionAUC), ("text_insertion_auc", InsertionAUC),
):
    METRICS.register(_name, _metric)


def metric_label(name: str) -> str:
    """A column's label in tables: the modality it scores, then its metric's label ("image conf. drop")."""
    modality = name.split("_", 1)[0]
    return f"{modality} {METRICS[name].label}" if modality in ("image", "text") else METRICS[name].label


__all__ = [
    "METRICS", "ConfidenceDrop", "ConfidenceIncrease", "CurveAUC", "DeletionAUC", "InsertionAUC", "MaskEnergy",
    "MeanOverSamples", "PointingGame", "TopKIoU", "confidence_drop", "confidence_increase", "curve_auc", "keep_image",
    "keep_text", "mask_energy", "metric_label", "perturbation_curve", "pointing_game", "standard_error",
    "text_perturbation_curve", "top_k_iou",
]
