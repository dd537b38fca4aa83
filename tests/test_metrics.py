"""Localisation metrics: functional and class forms agree and behave at the edges."""

from __future__ import annotations

import pytest
import torch

from m2ib_lightning.metrics import MaskEnergy, PointingGame, mask_energy, pointing_game


def _mask():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    return mask


def test_pointing_game_hits_misses_and_shares_ties():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # peak inside
    maps[1, 3, 3] = 1.0  # peak outside
    assert pointing_game(maps, _mask()).tolist() == [1.0, 0.0]
    flat = torch.ones(1, 4, 4)  # every pixel is a peak: the hit is the mask's share
    assert pointing_game(flat, _mask()[:1]).item() == pytest.approx(4 / 16)


def test_energy_share():
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 1.0
    maps[1] = 1.0
    assert mask_energy(maps, _mask()).tolist() == pytest.approx([1.0, 0.25])
    assert mask_energy(torch.zeros(1, 4, 4), _mask()[:1]).item() == 0.0


def test_classes_accumulate_the_functional_means():
    maps = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(0))
    masks = torch.cat([_mask()] * 3)
    pointing, energy = PointingGame(), MaskEnergy()
    for part in (slice(0, 2), slice(2, 6)):
        pointing.update(maps[part], masks[part])
        energy.update(maps[part], masks[part])
    assert pointing.compute().item() == pytest.approx(pointing_game(maps, masks).mean().item())
    assert energy.compute().item() == pytest.approx(mask_energy(maps, masks).mean().item(), rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="must both be"):
        pointing_game(torch.zeros(1, 4, 4), torch.zeros(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty mask"):
        mask_energy(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-negative"):
        mask_energy(-torch.ones(2, 4, 4), _mask())
