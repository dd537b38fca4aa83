"""The per-token information bottleneck of M2IB, as pure functions.

Written op for op like the reference implementation (YingWANGG/M2IB) so that
the numbers match it, including its float32 rounding: lambda = sigmoid(alpha),
mu = lambda * h, var = (1 - lambda)^2, z = mu + sqrt(var) * eps.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The reference initialises every alpha to 5.0 (lambda ~ 0.993: almost all signal kept).
INITIAL_ALPHA = 5.0


def masked_moments(hidden: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of the bottleneck's Gaussian: (lambda * h, (1 - lambda)^2)."""
    lamb = torch.sigmoid(alpha)
    return hidden * lamb, (1 - lamb) ** 2


def capacity(mu: Tensor, var: Tensor) -> Tensor:
    """Per-element KL(N(mu, var) || N(0, 1)) in nats."""
    return -0.5 * (1 + torch.log(var) - mu**2 - var)


def sample(mu: Tensor, var: Tensor, noise: Tensor) -> Tensor:
    """z = mu + sqrt(var) * eps, broadcasting mu and var over leading noise copies."""
    return mu + var.sqrt() * noise
