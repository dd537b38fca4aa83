"""Localisation of saliency maps against ground-truth masks, as torchmetrics metrics and functions.

- Pointing game: is the map's peak inside the mask (Zhang et al., 2016)? Ties at the
  peak: ``ties="share"`` (the default) scores the share of the tied peak pixels inside the
  mask, ``ties="any"`` a hit if any of them is inside (as Quantus counts). ``tolerance``: a
  peak within that many pixels of the mask is inside (Zhang et al. use 15 px at ImageNet
  size, as TorchRay does). The class form can also give the mean over classes of each
  class's hit rate (TorchRay's figure), next to the mean over samples.
- Energy: the share of the map's total mass that falls inside the mask
  (the "energy-based pointing game" of Score-CAM).
- Top-k IoU: intersection over union of the map's top-ranked pixels and the mask,
  ``|top ∩ mask| / |top ∪ mask|``; the top region holds ``fraction`` of the image, or
  by default as many pixels as the mask (so a perfect map scores 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .mean import MeanOverSamples


def _check(maps: Tensor, masks: Tensor) -> None:
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps and masks must both be (B, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")
    if not (masks.flatten(1).any(1)).all():
        raise ValueError("masks holds an empty mask: there is nothing to point at")


POINTING_TIES = ("share", "any")


def dilate(masks: Tensor, tolerance: int) -> Tensor:
    """(B, H, W) masks grown by every pixel within ``tolerance`` pixels (Euclidean) of them."""
    if tolerance == 0:
        return masks.bool()
    offsets = torch.arange(-tolerance, tolerance + 1, device=masks.device, dtype=torch.float32)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= tolerance**2).float()
    grown = torch.nn.functional.conv2d(masks[:, None].float(), disk[None, None], padding=tolerance)[:, 0]
    return grown > 0


def pointing_game(maps: Tensor, masks: Tensor, *, ties: str = "share", tolerance: int = 0) -> Tensor:
    """(B,) hit score of each map: the share of its peak pixels inside the mask (``ties="share"``), or 1 if any
    of them is (``ties="any"``); the mask grown by ``tolerance`` pixels first."""
    _check(maps, masks)
    if ties not in POINTING_TIES:
        raise ValueError(f"ties must be one of {list(POINTING_TIES)}, got {ties!r}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    flat, inside = maps.flatten(1), dilate(masks, tolerance).flatten(1)
    peak = flat == flat.amax(1, keepdim=True)
    hits = (peak & inside).sum(1)
    return (hits > 0).float() if ties == "any" else hits / peak.sum(1)


def mask_energy(maps: Tensor, masks: Tensor) -> Tensor:
    """(B,) share of each (non-negative) map's mass inside the mask; a zero map scores 0."""
    _check(maps, masks)
    if (maps < 0).any():
        raise ValueError("maps must be non-negative for the energy share")
    flat, inside = maps.flatten(1).double(), masks.flatten(1).bool()
    total = flat.sum(1)
    return torch.where(total > 0, (flat * inside).sum(1) / total.clamp_min(1e-300), 0).float()


def top_k_iou(maps: Tensor, masks: Tensor, fraction: float | None = None) -> Tensor:
    """(B,) IoU of each map's top-ranked pixels (``fraction`` of the image, default the mask's area) with its mask."""
    _check(maps, masks)
    flat, inside = maps.flatten(1), masks.flatten(1).bool()
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = inside.sum(1) if fraction is None else torch.full_like(inside.sum(1), max(1, round(fraction * flat.shape[1])))
    rank = flat.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
    top = rank < k[:, None]
    return (top & inside).sum(1) / (top | inside).sum(1)


class PointingGame(MeanOverSamples):
    """Mean pointing-game hit rate over all samples seen (summed across processes); with ``num_classes``,
    ``update(maps, masks, classes)`` also keeps each class's hits (a class index below 0: a sample without a
    class, left out of them), and :meth:`per_class_mean` is the mean over the classes seen of their hit rates."""

    higher_is_better = True
    label = "pointing game"

    def __init__(self, ties: str = "share", tolerance: int = 0, num_classes: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if ties not in POINTING_TIES or tolerance < 0:
            raise ValueError(f"ties must be one of {list(POINTING_TIES)} and tolerance >= 0, got {ties!r}, {tolerance}")
        self.ties, self.tolerance, self.num_classes = ties, tolerance, num_classes
        if num_classes is not None:
            self.add_state("class_hits", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("class_counts", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def _per_sample(self, maps: Tensor, masks: Tensor) -> Tensor:
        return pointing_game(maps, masks, ties=self.ties, tolerance=self.tolerance)

    def update(self, maps: Tensor | None = None, masks: Tensor | None = None, classes: Tensor | None = None, *,
               scores: Tensor | None = None) -> None:
        scores = self._per_sample(maps, masks) if scores is None else scores
        if self.num_classes is not None:
            if classes is None:
                raise ValueError("PointingGame(num_classes=...) needs the class of each sample: update(maps, masks, classes)")
            classes = torch.as_tensor(classes, device=self.class_counts.device).long()
            if classes.shape != scores.shape or bool((classes >= self.num_classes).any()):
                raise ValueError(f"classes must be one index below num_classes={self.num_classes} per sample, "
                                 f"got shape {tuple(classes.shape)} for {scores.numel()} samples")
            known = classes >= 0
            self.class_hits.index_add_(0, classes[known], scores[known].double().to(self.class_hits.device))
            self.class_counts.index_add_(0, classes[known], torch.ones_like(classes[known]))
        super().update(scores=scores)

    def update_scores(self, scores: Tensor, classes: Tensor | None = None) -> None:
        self.update(scores=scores, classes=classes)

    def class_rates(self) -> Tensor:
        """Each class's mean hit score over every process, NaN for a class no sample had."""
        if self.num_classes is None:
            raise ValueError("class_rates needs PointingGame(num_classes=...)")
        with self.sync_context():
            return (self.class_hits / self.class_counts).float()

    def per_class_mean(self) -> Tensor:
        """Mean over the classes seen (on every process) of each class's mean hit score."""
        rates = self.class_rates()
        return rates[~rates.isnan()].mean()
class MaskEnergy(MeanOverSamples):
    """Mean share of map energy inside the mask over all samples seen (summed across processes)."""

    higher_is_better = True
    label = "energy in mask"

    def _per_sample(self, maps: Tensor, masks: Tensor) -> Tensor:
        return mask_energy(maps, masks)


class TopKIoU(MeanOverSamples):
    """Mean IoU of the map's top region with the mask over all samples seen (summed across processes)."""

    higher_is_better = True
    label = "top-k IoU"

    def __init__(self, fraction: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fraction = fraction

    def _per_sample(self, maps: Tensor, masks: Tensor) -> Tensor:
        return top_k_iou(maps, masks, self.fraction)
