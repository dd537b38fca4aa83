"""Evaluation metrics for attribution maps."""

from .localisation import MaskEnergy, PointingGame, mask_energy, pointing_game

__all__ = ["MaskEnergy", "PointingGame", "mask_energy", "pointing_game"]
