"""The state every per-sample metric here shares: a sum and a count, summed across processes."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanOverSamples(Metric):
    """Mean of a per-sample score over every sample seen; subclasses say how a batch is scored."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_sample(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, *args: Tensor) -> None:
        scores = self._per_sample(*args)
        self.total += scores.sum().double()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()
