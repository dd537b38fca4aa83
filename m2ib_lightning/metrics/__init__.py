"""Evaluation metrics for attribution maps: torchmetrics classes (mean and standard error, synced across
processes) and their functional twins."""

from .confidence import ConfidenceDrop, ConfidenceIncrease, confidence_drop, confidence_increase, keep_image, keep_text
from .faithfulness import CurveAUC, curve_auc, perturbation_curve, text_perturbation_curve
from .localisation import MaskEnergy, PointingGame, TopKIoU, mask_energy, pointing_game, top_k_iou
from .mean import MeanOverSamples, standard_error

__all__ = [
    "ConfidenceDrop", "ConfidenceIncrease", "CurveAUC", "MaskEnergy", "MeanOverSamples", "PointingGame", "TopKIoU",
    "confidence_drop", "confidence_increase", "curve_auc", "keep_image", "keep_text", "mask_energy",
    "perturbation_curve", "pointing_game", "standard_error", "text_perturbation_curve", "top_k_iou",
]
