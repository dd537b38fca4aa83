"""The noise stream: one generator per sample, seeded, drawn in step order."""


from __future__ import annotations


import torch
from torch import Tensor




def generators_for(seeds: Tensor, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, on ``device``: a CPU generator's stream is the same on any machine."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds.tolist()]


def draw_noise(
    generators: list[torch.Generator], copies: int, token_mask: Tensor, dim: int, dtype: torch.dtype
) -> Tensor:
    """Standard-normal noise (B, K, T, D) on the generators' device: each sample draws (K, its real tokens, D) from its own."""
    batch, tokens = token_mask.shape
    device = generators[0].device
    mask = token_mask.to(device)
    noise = torch.zeros(batch, copies, tokens, dim, dtype=dtype, device=device)
    for row, gen in enumerate(generators):
        real = mask[row]
        draw = torch.randn((copies, int(real.sum()), dim), generator=gen, dtype=dtype, device=device)
        if bool(real.all()):
            noise[row] = draw
        else:
            noise[row][:, real] = draw
    return noise


# --------------------------------------------------------------------------- fit
