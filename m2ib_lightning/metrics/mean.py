"""The state every per-sample metric here shares: a sum, a sum of squares and a count, summed across processes."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric

NAN_STRATEGIES = ("propagate", "error", "warn", "ignore")


def standard_error(total: Tensor, squares: Tensor, count: Tensor) -> Tensor:
    """Standard error of the mean from sums: sqrt(s^2 / n) with the unbiased sample variance s^2; NaN for n < 2,
    where it is not defined (0 would claim a certainty one sample cannot give)."""
    n = count.double()
    if n < 2:
        return torch.full((), float("nan"), dtype=torch.float32, device=total.device)
    variance = ((squares - total * total / n) / (n - 1)).clamp_min(0)
    return (variance / n).sqrt().float()


class MeanOverSamples(Metric):
    """Mean of a per-sample score over every sample seen, with its standard error; subclasses say how a batch is scored.

    ``compute()`` is the mean, ``standard_error()`` its standard error; both sync across processes.
    ``nan_strategy`` says what a NaN score does, as in torchmetrics' aggregation metrics: ``propagate`` (the
    default: the mean becomes NaN, so a broken method shows in the table), ``error``, ``warn`` (dropped, with a
    warning) or ``ignore`` (dropped). A sample a metric does not apply to (no ground truth) is not passed at all.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, nan_strategy: str = "propagate", **kwargs) -> None:
        super().__init__(**kwargs)
        if nan_strategy not in NAN_STRATEGIES:
            raise ValueError(f"nan_strategy must be one of {list(NAN_STRATEGIES)}, got {nan_strategy!r}")
        self.nan_strategy = nan_strategy
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_sample(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, *args: Tensor, scores: Tensor | None = None) -> None:
        """Score a batch (the subclass's inputs), or add per-sample ``scores`` already computed."""
        scores = (self._per_sample(*args) if scores is None else scores).double().to(self.total.device)
        nans = scores.isnan()
        if self.nan_strategy != "propagate" and bool(nans.any()):
            message = f"{type(self).__name__}: {int(nans.sum())} of {scores.numel()} scores are NaN"
            if self.nan_strategy == "error":
                raise RuntimeError(message)
            if self.nan_strategy == "warn":
                warnings.warn(message + "; they are left out", UserWarning, stacklevel=2)
            scores = scores[~nans]
        self.total += scores.sum()
        self.squares += (scores * scores).sum()
        self.count += scores.numel()

    def update_scores(self, scores: Tensor) -> None:
        """Add per-sample scores already computed (by a functional twin, or by an earlier, resumed run)."""
        self.update(scores=scores)

    def compute(self) -> Tensor:
        return (self.total / self.count).float()

    def samples(self) -> int:
        """Samples seen on every process."""
        with self.sync_context():
            return int(self.count.item())

    def standard_error(self) -> Tensor:
        """Standard error of the mean over every sample seen on every process (NaN below 2 samples)."""
        with self.sync_context():
            return standard_error(self.total, self.squares, self.count)
