"""Faithfulness of maps: deletion and insertion curves (Petsiuk et al., RISE, 2018), for images and for text.

Deletion replaces what a map ranks highest, a growing share at a time, by a baseline
and follows the model's score; a faithful map makes the score fall fast (low area
under the curve, ``AUC = mean of the trapezoids over the fractions 0, 1/steps, ..., 1``).
Insertion starts from the baseline and puts the top-ranked parts back; a faithful
map makes the score rise fast (high area).

Images: pixels, or patches of ``unit`` x ``unit`` pixels ranked by the map's mean over
the patch; baselines ``zero`` (the dataset mean colour, after normalisation), ``mean``
(the image's own mean colour) or ``blur`` (RISE's own blur, whatever the image size: an
11 x 11 kernel made by smoothing a centred delta with a Gaussian of sigma 5 px, SciPy's
``gaussian_filter`` with its reflecting border, applied with zero padding). Text: the caption's words (real tokens other than BOS/EOS/CLS/SEP)
in map order, replaced by a chosen token id.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .mean import MeanOverSamples

BASELINES = ("zero", "mean", "blur")


def _check_mode(mode: str, steps: int) -> None:
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def rise_kernel(size: int = 11, sigma: float = 5.0, truncate: float = 4.0) -> Tensor:
    """RISE's ``gkern(11, 5)``: a centred delta on a ``size`` x ``size`` grid smoothed by a Gaussian of ``sigma``
    with SciPy's ``gaussian_filter`` (taps out to ``truncate`` sigmas, border mode ``reflect``); float64."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * taps**2 / sigma**2)
    weights = weights / weights.sum()
    index = torch.arange(-radius, size + radius) % (2 * size)  # the half-sample symmetric border, period 2 * size
    index = torch.where(index >= size, 2 * size - 1 - index, index)
    delta = (index == size // 2).double()
    line = torch.stack([(delta[i: i + 2 * radius + 1] * weights).sum() for i in range(size)])
    return line[:, None] * line[None, :]


def blurred(pixel_values: Tensor) -> Tensor:
    """RISE's insertion baseline: each channel convolved with :func:`rise_kernel`, zero padding, same size."""
    kernel = rise_kernel().to(pixel_values.dtype).to(pixel_values.device)
    c, pad = pixel_values.shape[1], kernel.shape[-1] // 2
    return F.conv2d(pixel_values, kernel.expand(c, 1, *kernel.shape), padding=pad, groups=c)


def image_baseline(pixel_values: Tensor, baseline: str) -> Tensor:
    if baseline == "zero":
        return torch.zeros_like(pixel_values)
    if baseline == "mean":
        return pixel_values.mean((2, 3), keepdim=True).expand_as(pixel_values)
    if baseline == "blur":
        return blurred(pixel_values)
    raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")


def perturbation_curve(
    score: Callable[[Tensor], Tensor], pixel_values: Tensor, maps: Tensor, *, mode: str, steps: int = 10,
    unit: int = 1, baseline: str = "zero",
) -> Tensor:
    """(B, steps + 1) scores with 0, 1/steps, ..., all of the top-ranked pixels (or patches) deleted or inserted."""
    _check_mode(mode, steps)
    b, c, h, w = pixel_values.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps must be (B, H, W) = {(b, h, w)}, got {tuple(maps.shape)}")
    if unit < 1 or h % unit or w % unit:
        raise ValueError(f"unit must be >= 1 and divide the image size {h}x{w}, got {unit}")
    cells = F.avg_pool2d(maps[:, None].float(), unit)[:, 0] if unit > 1 else maps
    rows, cols = cells.shape[-2:]
    rank = cells.flatten(1).argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)  # 0 = most salient
    fractions = torch.arange(steps + 1, device=maps.device) / steps
    top = rank[:, None, :] < (fractions * rows * cols).round().long()[None, :, None]  # (B, steps+1, cells)
    top = top.view(b * (steps + 1), 1, rows, cols)
    if unit > 1:
        top = top.repeat_interleave(unit, dim=2).repeat_interleave(unit, dim=3)
    top = top.view(b, steps + 1, 1, h, w)
    images = pixel_values[:, None].expand(b, steps + 1, c, h, w)
    filled = image_baseline(pixel_values, baseline)[:, None].expand(b, steps + 1, c, h, w)
    perturbed = torch.where(top, filled, images) if mode == "deletion" else torch.where(top, images, filled)
    with torch.no_grad():
        return score(perturbed.reshape(b * (steps + 1), c, h, w)).view(b, steps + 1)


def text_perturbation_curve(
    score: Callable[[Tensor], Tensor], input_ids: Tensor, maps: Tensor, words: Tensor, replacement_id: int, *,
    mode: str, steps: int = 10,
) -> Tensor:
    """(B, steps + 1) scores with 0, 1/steps, ..., all of each caption's words replaced (deletion) or restored
    (insertion) in the map's order; ``score`` takes (B * (steps + 1), L) ids, grouped by sample."""
    _check_mode(mode, steps)
    if maps.shape != input_ids.shape or words.shape != input_ids.shape:
        raise ValueError(f"maps and words must have the shape of input_ids {tuple(input_ids.shape)}")
    b, length = input_ids.shape
    ranked = maps.float().masked_fill(~words, float("-inf"))
    rank = ranked.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
    fractions = torch.arange(steps + 1, device=maps.device) / steps
    counts = (fractions[None, :] * words.sum(1, keepdim=True)).round().long()  # (B, steps+1) words touched
    top = (rank[:, None, :] < counts[:, :, None]) & words[:, None, :]  # (B, steps+1, L)
    touched = top if mode == "deletion" else words[:, None, :] & ~top
    ids = input_ids[:, None].expand(b, steps + 1, length).masked_fill(touched, replacement_id)
    with torch.no_grad():
        return score(ids.reshape(b * (steps + 1), length)).view(b, steps + 1)


def curve_auc(curves: Tensor) -> Tensor:
    """(B,) trapezoidal area under curves sampled evenly on [0, 1]."""
    steps = curves.shape[1] - 1
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * steps)


class CurveAUC(MeanOverSamples):
    """Mean area under deletion or insertion curves over all samples seen (summed across processes)."""

    label = "AUC"

    def _per_sample(self, curves: Tensor) -> Tensor:
        return curve_auc(curves)


class DeletionAUC(CurveAUC):
    """Mean area under deletion curves: the score as the top-ranked parts go first (lower is better)."""

    higher_is_better = False
    label = "deletion AUC"


class InsertionAUC(CurveAUC):
    """Mean area under insertion curves: the score as the top-ranked parts come back first (higher is better)."""

    higher_is_better = True
    label = "insertion AUC"
