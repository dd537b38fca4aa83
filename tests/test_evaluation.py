"""Baselines, faithfulness curves, and the comparison run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_clip
from m2ib_lightning.baselines import (
    BASELINES, GradientSaliency, ImageTextScore, IntegratedGradientsMap, RandomMap, TokenGradientXActivation,
)
from m2ib_lightning.metrics import CurveAUC, curve_auc, perturbation_curve


@pytest.fixture(scope="module")
def model():
    return tiny_clip(seed=5)


@pytest.fixture(scope="module")
def pair():
    from conftest import make_images, make_texts

    ids, mask = make_texts([5, 8], seed=2)
    return make_images(2, seed=2), ids, mask


@pytest.mark.parametrize(
    "make", [GradientSaliency, lambda m: IntegratedGradientsMap(m, steps=4), lambda m: TokenGradientXActivation(m, layer=1), RandomMap]
)
def test_baselines_give_normalised_maps_and_leave_the_model_alone(model, pair, make):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    maps = make(model).attribute(*pair)
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert set(BASELINES) == {"saliency", "integrated_gradients", "grad_x_activation", "random"}


def test_score_is_the_cosine_of_the_pair_and_groups_copies_by_sample(model, pair):
    pixels, ids, mask = pair
    score = ImageTextScore(model, ids, mask)
    single = score(pixels)
    assert single.shape == (2,) and (single.abs() <= 1).all()
    copies = score(pixels.repeat_interleave(3, dim=0))
    torch.testing.assert_close(copies.view(2, 3), single[:, None].expand(2, 3), atol=1e-5, rtol=0)


def test_deletion_and_insertion_curves_on_a_linear_score():
    weights = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    score = lambda x: (x * weights).flatten(1).sum(1)  # noqa: E731
    pixels = torch.ones(1, 3, 8, 8)
    best, worst = weights.sum(1), -weights.sum(1)
    deletion = perturbation_curve(score, pixels, best, mode="deletion", steps=8)
    insertion = perturbation_curve(score, pixels, best, mode="insertion", steps=8)
    torch.testing.assert_close(deletion[:, 0], score(pixels))
    torch.testing.assert_close(deletion[:, -1], torch.zeros(1))
    torch.testing.assert_close(insertion[:, 0], torch.zeros(1))
    torch.testing.assert_close(insertion[:, -1], score(pixels))
    assert (deletion[:, 1:] <= deletion[:, :-1] + 1e-6).all()
    assert curve_auc(deletion) < curve_auc(perturbation_curve(score, pixels, worst, mode="deletion", steps=8))
    assert curve_auc(insertion) > curve_auc(perturbation_curve(score, pixels, worst, mode="insertion", steps=8))


def test_curve_auc_metric_is_the_trapezoid_mean():
    metric = CurveAUC()
    metric.update(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    metric.update(torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(metric.compute(), torch.tensor((0.5 + 1.0 + 0.25) / 3))
    with pytest.raises(ValueError, match="mode must be"):
        perturbation_curve(lambda x: x.sum(), torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), mode="erase")


def test_evaluate_run_prints_and_saves_a_comparison_table(tmp_path, tiny_bundle):
    from m2ib_lightning.config import CONFIG_DIR, load_config
    from m2ib_lightning.tasks.evaluate import run

    cfg = load_config(CONFIG_DIR / "evaluate_shapes.yaml", [
        f"output_dir={tmp_path}", f"model.name_or_path={tiny_bundle}", "data.num_samples=4", "data.batch_size=2",
        "m2ib.text_layer=0", "m2ib.steps=2", "m2ib.num_noise=2", "baselines.integrated_gradients_steps=2",
        "faithfulness_steps=4",
    ])
    summary = run(cfg)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["methods"]) == {"m2ib", "saliency", "integrated_gradients", "grad_x_activation", "random"}
    for row in summary["methods"].values():
        assert set(row) == {"pointing_game", "energy", "deletion_auc", "insertion_auc", "seconds_per_pair"}
        assert 0 <= row["pointing_game"] <= 1 and 0 <= row["energy"] <= 1
    with pytest.raises(ValueError, match="methods has unknown entries"):
        run(load_config(CONFIG_DIR / "evaluate_shapes.yaml", [f"output_dir={tmp_path}", f"model.name_or_path={tiny_bundle}",
                                                             "methods=[m2ib,lime]"]))
