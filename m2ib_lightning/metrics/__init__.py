"""Evaluation metrics for attribution maps."""

from .faithfulness import CurveAUC, curve_auc, perturbation_curve
from .localisation import MaskEnergy, PointingGame, mask_energy, pointing_game

__all__ = ["CurveAUC", "MaskEnergy", "PointingGame", "curve_auc", "mask_energy", "perturbation_curve", "pointing_game"]
