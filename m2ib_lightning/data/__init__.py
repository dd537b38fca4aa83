"""Data: the synthetic shapes world (and, later, manifests of real image-text pairs)."""

from .world import COLOURS, SHAPES, Caption, Scene, ShapeObject, ShapesWorld, WorldSample, render, vocabulary

__all__ = ["COLOURS", "SHAPES", "Caption", "Scene", "ShapeObject", "ShapesWorld", "WorldSample", "render", "vocabulary"]
