"""How an evaluation scores maps: one dataclass, read by the evaluator and by the ``evaluate`` task's schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class MetricSettings:
    """The settings that define the evaluation table's metrics (``metrics.*`` in a config)."""

    steps: int = 10  # deletion/insertion fractions 0, 1/steps, ..., 1
    unit: Optional[int] = None  # pixels per deletion cell side; unset: the model's patch size
    deletion_baseline: str = "zero"  # zero (the mean colour after normalisation) | mean (the image's) | blur
    insertion_baseline: str = "blur"
    replacement_id: Optional[int] = None  # the token id that replaces words; unset: the adapter's neutral id (never BOS/EOS)
    top_k_fraction: Optional[float] = None  # top region of top-k IoU; unset: as large as the mask
    confidence_drop: str = "absolute"  # absolute (the official M2IB script) | relative (Chattopadhay et al.'s Average Drop)
    pointing_ties: str = "share"  # share of the tied peak pixels inside the mask | any (a hit if one is, as Quantus)
    pointing_tolerance: int = 0  # pixels: a peak this close to the mask counts as inside (TorchRay: 15 at 224 px)
    classes: Optional[List[str]] = None  # classes of the ground truth (manifest "class"); unset: the world's shapes

    def class_index(self, name: str | None) -> int:
        """The index of a sample's class in ``classes``; -1 for a sample without one (or without a class list)."""
        return -1 if name is None or not self.classes else list(self.classes).index(name)
