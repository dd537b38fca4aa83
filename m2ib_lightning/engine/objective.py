"""One tower's objective and its fit: beta * capacity - cosine to the other tower's embedding, Adam on alpha;
and eval mode, restored after."""


from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import Modality, TowerState, VisionLanguageBackbone
from ..bottleneck import INITIAL_ALPHA, capacity, masked_moments, sample
from .config import M2IBConfig
from .noise import draw_noise, generators_for
from .result import TowerFit



class TowerObjective:
    """Per-sample M2IB loss terms of one tower for a batch; everything constant is prepared once.

    Calling it with alpha (B, T, D) and noise (B, K, T, D) returns the capacity
    term (B,), the fit term (B,) and the per-element capacity (B, T, D), zero
    at padding. Sample b's terms depend on alpha[b] and noise[b] only.
    """

    def __init__(
        self, backbone: VisionLanguageBackbone, modality: Modality, state: TowerState, target: Tensor, copies: int,
        precision: str = "32",
    ):
        self.backbone, self.modality, self.copies = backbone, modality, copies
        self.bf16 = precision == "bf16"
        self.hidden = state.hidden.detach()
        self.token_mask = state.token_mask
        self.copied_state = state.repeat_interleave(copies)
        self.copied_target = target.detach().repeat_interleave(copies, dim=0)
        self.element_mask = state.token_mask[:, :, None].to(self.hidden.dtype)
        self.real = state.token_mask[:, None, :, None]  # (B, 1, T, 1): positions that get noise
        self.elements = state.token_mask.sum(1).to(self.hidden.dtype) * self.hidden.shape[-1]

    def __call__(self, alpha: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden, (batch, tokens, dim) = self.hidden, self.hidden.shape
        with torch.autocast(hidden.device.type, enabled=False):  # the bottleneck and the loss stay in full precision
            mu, var = masked_moments(hidden, alpha)
            nats = capacity(mu, var) * self.element_mask  # the same for every noise copy
            noisy = torch.where(self.real, sample(mu[:, None], var[:, None], noise), hidden[:, None])
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            embedding = self.backbone.tail(self.modality, noisy.reshape(batch * self.copies, tokens, dim), self.copied_state)
        with torch.autocast(hidden.device.type, enabled=False):
            fit = F.cosine_similarity(embedding.to(hidden.dtype), self.copied_target, dim=-1, eps=1e-6).view(batch, self.copies).mean(1)
            return nats.sum((1, 2)) / self.elements, fit, nats


def fit_tower(
    backbone: VisionLanguageBackbone,
    modality: Modality,
    state: TowerState,
    target: Tensor,
    seeds: Tensor,
    config: M2IBConfig,
) -> TowerFit:
    """Fit the bottleneck on ``state.hidden`` for a batch; ``target`` is the other tower's clean embedding."""
    objective = TowerObjective(backbone, modality, state, target, config.num_noise, config.precision)
    hidden = objective.hidden
    generators = generators_for(seeds, hidden.device if config.noise_device == "auto" else "cpu")
    alpha = torch.full_like(hidden, INITIAL_ALPHA, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=config.lr)
    capacity_curve, fit_curve = [], []
    # One autocast region over the whole fit, so that bf16 casts of the weights are made once, not at every step.
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=objective.bf16):
        for step in range(config.steps):
            noise = draw_noise(generators, config.num_noise, state.token_mask, hidden.shape[-1], hidden.dtype)
            compression, fit, nats = objective(alpha, noise.to(hidden.device))
            capacity_curve.append(compression.detach())
            fit_curve.append(fit.detach())
            if step == config.steps - 1:
                break  # the map is read from this pass; the reference's last update changes nothing that is returned
            loss = (config.beta * compression - fit).sum()  # a sum: each sample's gradient equals its solo run's
            (alpha.grad,) = torch.autograd.grad(loss, [alpha])
            with torch.autocast(hidden.device.type, enabled=False):
                optimizer.step()
    return TowerFit(
        capacity=nats.detach().sum(-1),
        fit=fit.detach(),
        capacity_curve=torch.stack(capacity_curve),
        fit_curve=torch.stack(fit_curve),
    )


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards, also on errors."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag
