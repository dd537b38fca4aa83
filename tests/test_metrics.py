"""Localisation metrics: functional and class forms agree and behave at the edges."""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------ worked by hand
from m2ib_lightning.metrics import (  # noqa: E402
    ConfidenceDrop, ConfidenceIncrease, CurveAUC, TopKIoU, confidence_drop, confidence_increase, curve_auc, keep_image,
    keep_text, perturbation_curve, standard_error, text_perturbation_curve, top_k_iou,
)


def test_confidence_drop_and_increase_by_hand_with_standard_errors():
    clean, perturbed = torch.tensor([0.5, 0.2, 0.3]), torch.tensor([0.3, 0.4, 0.3])
    assert confidence_drop(clean, perturbed).tolist() == pytest.approx([20.0, 0.0, 0.0])
    assert confidence_increase(clean, perturbed).tolist() == [0.0, 100.0, 0.0]
    drop, increase = ConfidenceDrop(), ConfidenceIncrease()
    drop.update(clean[:1], perturbed[:1])
    drop.update(clean[1:], perturbed[1:])
    increase.update(clean, perturbed)
    assert drop.compute().item() == pytest.approx(20 / 3)
    # values 20, 0, 0: sample std sqrt(400/3), standard error sqrt(400/3) / sqrt(3) = 20/3
    assert drop.standard_error().item() == pytest.approx(20 / 3, rel=1e-6)
    assert increase.compute().item() == pytest.approx(100 / 3)
    assert increase.standard_error().item() == pytest.approx(100 / 3, rel=1e-6)
    one = ConfidenceDrop()
    one.update(torch.tensor([0.9]), torch.tensor([0.1]))
    assert one.compute().item() == pytest.approx(80.0) and math.isnan(one.standard_error().item())  # undefined for n = 1
    assert standard_error(torch.tensor(6.0, dtype=torch.float64), torch.tensor(12.0, dtype=torch.float64), torch.tensor(3)).item() == 0


def test_keep_image_multiplies_by_the_whole_map():
    pixels = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep_image(pixels, torch.ones(1, 4, 4)), pixels)
    assert torch.equal(keep_image(pixels, torch.zeros(1, 4, 4)), torch.zeros_like(pixels))
    half = torch.zeros(1, 4, 4)
    half[0, :, :2] = 0.5
    torch.testing.assert_close(keep_image(pixels, half)[..., :2], pixels[..., :2] * 0.5)


def test_keep_text_replaces_words_at_or_below_the_median_and_keeps_bos_eos():
    ids = torch.tensor([[49406, 10, 11, 12, 13, 49407, 0]])
    words = torch.tensor([[False, True, True, True, True, False, False]])
    maps = torch.tensor([[1.0, 0.1, 0.5, 0.9, 0.3, 1.0, 0.0]])
    # words 0.1, 0.5, 0.9, 0.3: lower median 0.3, so 0.1 and 0.3 go
    assert keep_text(ids, maps, words, 99).tolist() == [[49406, 99, 11, 12, 99, 49407, 0]]
    constant = torch.full_like(maps, 0.5)
    assert keep_text(ids, constant, words, 99).tolist() == [[49406, 99, 99, 99, 99, 49407, 0]]
    zero = torch.zeros_like(maps)
    assert keep_text(ids, zero, words, 99).tolist() == [[49406, 99, 99, 99, 99, 49407, 0]]
    single = torch.tensor([[False, True, False, False, False, False, False]])
    assert keep_text(ids, maps, single, 99).tolist() == [[49406, 99, 11, 12, 13, 49407, 0]]


def test_top_k_iou_by_hand():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2] = True  # 2 pixels
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 1.0, 0.9  # top-2 region: one pixel inside, one outside
    assert top_k_iou(maps, mask).item() == pytest.approx(1 / 3)
    maps[0, 0, 1] = 0.95
    assert top_k_iou(maps, mask).item() == pytest.approx(1.0)
    assert top_k_iou(maps, mask, fraction=4 / 16).item() == pytest.approx(2 / 4)
    metric = TopKIoU()
    metric.update(maps, mask)
    assert metric.compute().item() == pytest.approx(1.0)
    constant = torch.ones(1, 4, 4)  # ties broken by position: the first two pixels, which are the mask here
    assert top_k_iou(constant, mask).item() == pytest.approx(1.0)


def test_patch_deletion_follows_the_patch_order_by_hand():
    pixels = torch.ones(1, 1, 4, 4)
    weights = torch.tensor([[4.0, 3.0], [2.0, 1.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    score = lambda x: (x[:, 0] * weights).flatten(1).sum(1)  # noqa: E731
    curve = perturbation_curve(score, pixels, weights[None], mode="deletion", steps=4, unit=2)
    assert curve[0].tolist() == pytest.approx([40.0, 24.0, 12.0, 4.0, 0.0])  # patches of weight 16, 12, 8, 4 go
    assert curve_auc(curve).item() == pytest.approx((40 + 24 + 24 + 12 + 12 + 4 + 4 + 0) / 8)
    mean = perturbation_curve(score, pixels * 2, weights[None], mode="insertion", steps=4, unit=2, baseline="mean")
    assert mean[0, 0].item() == pytest.approx(80.0)  # the mean colour of a constant image is the image
    with pytest.raises(ValueError, match="divide"):
        perturbation_curve(score, pixels, weights[None], mode="deletion", unit=3)
    with pytest.raises(ValueError, match="baseline must be"):
        perturbation_curve(score, pixels, weights[None], mode="deletion", baseline="noise")


def test_text_curves_by_hand():
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    words = torch.tensor([[False, True, True, True, False]])
    maps = torch.tensor([[0.0, 0.2, 0.9, 0.5, 0.0]])
    weights = {5: 1.0, 6: 4.0, 7: 2.0}

    def score(x):  # the sum of the weights of the words still there
        return torch.tensor([sum(weights.get(t, 0.0) for t in row.tolist()) for row in x])
    deletion = text_perturbation_curve(score, ids, maps, words, 0, mode="deletion", steps=3)
    insertion = text_perturbation_curve(score, ids, maps, words, 0, mode="insertion", steps=3)
    assert deletion[0].tolist() == [7.0, 3.0, 1.0, 0.0]  # 6 (0.9) goes first, then 7 (0.5), then 5
    assert insertion[0].tolist() == [0.0, 4.0, 6.0, 7.0]
    assert ids.tolist() == [[1, 5, 6, 7, 2]]


def test_curve_auc_metric_mean_and_error():
    metric = CurveAUC()
    metric.update(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    metric.update(torch.tensor([[0.0, 0.0, 1.0]]))
    values = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64)
    assert metric.compute().item() == pytest.approx(values.mean().item())
    assert metric.standard_error().item() == pytest.approx((values.std() / 3**0.5).item(), rel=1e-6)


DDP_SCRIPT = r'''
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from m2ib_lightning.metrics import ConfidenceDrop, ConfidenceIncrease, CurveAUC, MaskEnergy, PointingGame, TopKIoU

def data():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(10, 4, 4, generator=g)
    masks = torch.rand(10, 4, 4, generator=g) > 0.6
    masks[:, 0, 0] = True
    clean, perturbed = torch.rand(10, generator=g), torch.rand(10, generator=g)
    curves = torch.rand(10, 5, generator=g)
    return maps, masks, clean, perturbed, curves

def score(rank, world, rows):
    maps, masks, clean, perturbed, curves = data()
    metrics = {"drop": ConfidenceDrop(), "increase": ConfidenceIncrease(), "auc": CurveAUC(), "pointing": PointingGame(),
               "energy": MaskEnergy(), "iou": TopKIoU()}
    part = rows[rank]
    metrics["drop"].update(clean[part], perturbed[part]); metrics["increase"].update(clean[part], perturbed[part])
    metrics["auc"].update(curves[part])
    for k in ("pointing", "energy", "iou"):
        metrics[k].update(maps[part], masks[part])
    return {k: (m.compute().item(), m.standard_error().item()) for k, m in metrics.items()}

def worker(rank, world, out):
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    result = score(rank, world, [list(range(0, 10, 2)), list(range(1, 10, 2))])
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()

if __name__ == "__main__":
    out = sys.argv[1]
    mp.spawn(worker, args=(2, out), nprocs=2)
    torch.save(score(0, 1, [list(range(10))]), out + ".one")
'''


def test_every_metric_on_two_processes_equals_one(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "ddp_metrics.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "two.pt"
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = torch.load(out, weights_only=True), torch.load(str(out) + ".one", weights_only=True)
    assert set(two) == set(one) == {"drop", "increase", "auc", "pointing", "energy", "iou"}
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def test_curves_of_constant_all_zero_and_one_token_maps_by_hand():
    pixels = torch.ones(1, 1, 2, 2)
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    score = lambda x: (x[:, 0] * weights).flatten(1).sum(1)  # noqa: E731
    for flat in (torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5)):  # ties: raster order
        assert perturbation_curve(score, pixels, flat, mode="deletion", steps=4)[0].tolist() == pytest.approx([10, 9, 7, 4, 0])
        assert perturbation_curve(score, pixels, flat, mode="insertion", steps=4)[0].tolist() == pytest.approx([0, 1, 3, 6, 10])
    ids, words = torch.tensor([[1, 7, 2]]), torch.tensor([[False, True, False]])
    one = lambda x: (x == 7).any(1).float()  # noqa: E731
    for maps in (torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 0.0]])):
        assert text_perturbation_curve(one, ids, maps, words, 0, mode="deletion", steps=2)[0].tolist() == [1.0, 1.0, 0.0]
        assert text_perturbation_curve(one, ids, maps, words, 0, mode="insertion", steps=2)[0].tolist() == [0.0, 0.0, 1.0]
