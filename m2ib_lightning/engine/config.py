"""The fit's settings."""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from ..backbones import Modality


Seeds = int | Sequence[int] | Tensor


@dataclass(frozen=True)
class M2IBConfig:
    """Hyper-parameters of the fit; the defaults are the reference's."""

    vision_layer: int = 9  # negative: counted from the last block (-1)
    text_layer: int = 9
    beta: float = 0.1
    steps: int = 10
    lr: float = 1.0
    num_noise: int = 10
    #: Fit each sample on its own (same shapes as a solo run), so that its maps are bitwise the same
    #: whatever its batch-mates, batch size or device count. False fits the batch at once: faster on
    #: GPUs, equal in exact arithmetic, but float32 rounding then differs with the batch (~1e-6 on maps).
    batch_invariant: bool = True
    #: Where the noise is drawn: "cpu" (per-sample CPU generators; the stream of the official code and of
    #: every device) or "auto" (per-sample generators on the fitting device: no host-to-device copy each
    #: step on GPUs; on a GPU its maps differ from the CPU stream's, on a CPU they are the same).
    noise_device: str = "cpu"
    #: "32": float32 throughout (exact to the reference). "bf16": the tail (the blocks after the bottleneck)
    #: runs under bfloat16 autocast; alpha, the loss and Adam stay float32.
    precision: str = "32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", str(self.precision))
        if self.noise_device not in ("cpu", "auto"):
            raise ValueError(f"noise_device must be 'cpu' or 'auto', got {self.noise_device!r}")
        if self.precision not in ("32", "bf16"):
            raise ValueError(f"precision must be '32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.batch_invariant, bool):
            raise TypeError(f"batch_invariant must be a bool, got {type(self.batch_invariant).__name__}")
        for name in ("vision_layer", "text_layer", "steps", "num_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.num_noise < 1:
            raise ValueError(f"num_noise must be >= 1, got {self.num_noise}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")

    def layer(self, modality: Modality) -> int:
        return self.vision_layer if modality == "image" else self.text_layer
