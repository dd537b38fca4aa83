"""The embedded shapes world and the models trained on it, apart from the library they demonstrate: scenes with
ground-truth masks and captions (world), questions about them (questions), their datasets for training, the
builders of the shipped models (models) and their checkpoints (assets)."""

from .world import COLOURS, SHAPES, Caption, Scene, ShapeObject, ShapesWorld, WorldSample, render, vocabulary

__all__ = ["COLOURS", "SHAPES", "Caption", "Scene", "ShapeObject", "ShapesWorld", "WorldSample", "render", "vocabulary"]
