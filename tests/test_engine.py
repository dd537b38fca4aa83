"""The M2IB engine against a naive reference, and the invariants batching must keep.

Exactness is asserted in float64, where both implementations agree to ~1e-13:
the statement tested is that the engine computes the reference's algorithm.
In float32, Adam at lr 1.0 divides each gradient by its own magnitude, so
last-bit differences (another summation order, another BLAS blocking) grow
over the 10 steps to ~1e-5 on the maps; the float32 tests bound that drift.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import m2ib_lightning
from conftest import make_images, make_texts, tiny_clip
from m2ib_lightning import M2IB, M2IBConfig, attribute
from m2ib_lightning.backbones import as_backbone
from m2ib_lightning.engine import TowerObjective
from m2ib_lightning.testing import naive_m2ib


# transformers 4.4x's own CLIP text tower cannot run in float64 (it fills a float32 mask with float64's min).
float64_clip = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="transformers 4.x CLIP fails in float64"
)


@pytest.fixture(scope="module")
def clip64():
    return tiny_clip(seed=1).double()


@float64_clip
@pytest.mark.parametrize(
    "vision_layer,text_layer,beta,seed,length",
    [(0, 0, 0.1, 0, 5), (1, 2, 0.1, 7, 9), (3, 3, 0.1, 3, 12), (2, 1, 1.0, 11, 7), (3, 0, 0.01, 5, 3)],
)
def test_matches_naive_reference_float64(clip64, vision_layer, text_layer, beta, seed, length):
    ids, mask = make_texts([length], seed=seed)
    pixels = make_images(1, seed=seed).double()
    kwargs = dict(vision_layer=vision_layer, text_layer=text_layer, beta=beta, seed=seed)
    result = attribute(clip64, pixels, ids, mask, **kwargs)
    image_map, text_map, image_capacity, text_capacity = naive_m2ib(clip64, pixels, ids, **kwargs)

    assert result.image_maps.shape == (1, 32, 32) and result.text_maps.shape == (1, length)
    torch.testing.assert_close(result.image_maps[0], image_map, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.text_maps[0], text_map, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.image_capacity[0], image_capacity, atol=1e-9, rtol=0)
    torch.testing.assert_close(result.text_capacity[0], text_capacity, atol=1e-9, rtol=0)


@pytest.mark.parametrize("vision_layer,text_layer", [(0, 0), (2, 1), (3, 3)])
def test_matches_naive_reference_float32(clip, vision_layer, text_layer):
    ids, mask = make_texts([8], seed=2)
    pixels = make_images(1, seed=2)
    kwargs = dict(vision_layer=vision_layer, text_layer=text_layer, seed=2)
    result = attribute(clip, pixels, ids, mask, **kwargs)
    image_map, text_map, _, _ = naive_m2ib(clip, pixels, ids, **kwargs)
    torch.testing.assert_close(result.image_maps[0], image_map, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.text_maps[0], text_map, atol=1e-4, rtol=0)


@float64_clip
def test_other_hyperparameters_match_naive_reference(clip64):
    ids, mask = make_texts([6], seed=4)
    pixels = make_images(1, seed=4).double()
    kwargs = dict(vision_layer=1, text_layer=1, beta=0.5, steps=4, lr=0.3, num_noise=3, seed=9)
    result = attribute(clip64, pixels, ids, mask, **kwargs)
    image_map, text_map, _, _ = naive_m2ib(clip64, pixels, ids, **kwargs)
    torch.testing.assert_close(result.image_maps[0], image_map, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.text_maps[0], text_map, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "batch_invariant,dtype,atol",
    [
        (True, torch.float32, 0.0),
        pytest.param(False, torch.float64, 1e-12, marks=float64_clip),
        (False, torch.float32, 1e-5),
    ],
)
def test_batch_invariance(batch_invariant, dtype, atol):
    """Each sample of a padded batch gets its solo maps: bitwise when batch_invariant, else up to rounding."""
    model = tiny_clip(seed=2).to(dtype)
    lengths = [5, 11, 3, 8]
    ids, mask = make_texts(lengths, width=14, seed=5)
    pixels = make_images(4, seed=5).to(dtype)
    seeds = torch.tensor([10, 20, 30, 40])
    kwargs = dict(vision_layer=1, text_layer=2, batch_invariant=batch_invariant)
    batch = attribute(model, pixels, ids, mask, seed=seeds, **kwargs)
    for row, length in enumerate(lengths):
        solo = attribute(model, pixels[row : row + 1], ids[row : row + 1, :length], None, seed=int(seeds[row]), **kwargs)
        torch.testing.assert_close(batch.image_maps[row], solo.image_maps[0], atol=atol, rtol=0)
        torch.testing.assert_close(batch.text_maps[row, :length], solo.text_maps[0], atol=atol, rtol=0)
        assert torch.all(batch.text_maps[row, length:] == 0)
        assert torch.all(batch.text_capacity[row, length:] == 0)


def test_maps_are_normalised_and_shaped(clip):
    ids, mask = make_texts([4, 9], seed=1)
    result = attribute(clip, make_images(2), ids, mask, vision_layer=1, text_layer=1, seed=0)
    assert result.image_maps.shape == (2, 32, 32)
    assert result.image_capacity.shape == (2, 1 + 16)
    assert result.image_patch_capacity.shape == (2, 4, 4)
    for maps in (result.image_maps, result.text_maps):
        assert maps.min() >= 0 and maps.max() <= 1
        assert torch.allclose(maps.flatten(1).amax(1), torch.ones(2))
    assert result.curves["image/fit"].shape == (10, 2)
    batched = attribute(clip, make_images(2), ids, mask, vision_layer=1, text_layer=1, seed=0, batch_invariant=False)
    assert batched.text_capacity.shape == result.text_capacity.shape == (2, 9)
    torch.testing.assert_close(batched.image_maps, result.image_maps, atol=1e-4, rtol=0)


def test_same_seed_same_maps_and_seed_changes_them(clip):
    ids, mask = make_texts([6], seed=3)
    pixels = make_images(1, seed=3)
    first = attribute(clip, pixels, ids, mask, vision_layer=1, text_layer=1, seed=4)
    again = attribute(clip, pixels, ids, mask, vision_layer=1, text_layer=1, seed=4)
    other = attribute(clip, pixels, ids, mask, vision_layer=1, text_layer=1, seed=5)
    assert torch.equal(first.image_maps, again.image_maps)
    assert not torch.equal(first.image_capacity, other.image_capacity)


def test_no_cross_talk_between_samples(clip):
    """d loss_i / d alpha_j is exactly zero for i != j, in both towers, through the engine's own objective."""
    backbone = as_backbone(clip)
    ids, mask = make_texts([4, 7, 5], seed=6)
    inputs = {"image": {"pixel_values": make_images(3, seed=6)}, "text": {"input_ids": ids, "attention_mask": mask}}
    for modality, target_modality in (("image", "text"), ("text", "image")):
        state = backbone.prefix(modality, inputs[modality], 1)
        target = backbone.embed(target_modality, inputs[target_modality]).detach()
        objective = TowerObjective(backbone, modality, state, target, copies=2)
        alpha = torch.full_like(state.hidden, 2.0).requires_grad_(True)
        compression, fit, _ = objective(alpha, torch.randn(3, 2, *state.hidden.shape[1:]))
        losses = 0.1 * compression - fit
        for i in range(3):
            (grad,) = torch.autograd.grad(losses[i], alpha, retain_graph=True)
            others = [j for j in range(3) if j != i]
            assert torch.count_nonzero(grad[others]) == 0
            assert torch.count_nonzero(grad[i]) > 0


def _hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_model_untouched(clip):
    clip.train()
    before = {name: p.detach().clone() for name, p in clip.named_parameters()}
    flags = [p.requires_grad for p in clip.parameters()]
    hooks = _hook_count(clip)
    ids, mask = make_texts([6], seed=8)
    attribute(clip, make_images(1, seed=8), ids, mask, vision_layer=2, text_layer=2)
    assert all(torch.equal(p, before[name]) for name, p in clip.named_parameters())
    assert all(p.grad is None for p in clip.parameters())
    assert [p.requires_grad for p in clip.parameters()] == flags
    assert _hook_count(clip) == hooks
    assert clip.training and all(m.training for m in clip.modules())
    clip.eval()


def test_model_untouched_after_error_inside_fit(clip, monkeypatch):
    backbone = as_backbone(clip)
    calls = {"n": 0}
    real_tail = backbone.tail

    def failing_tail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_tail(*args, **kwargs)

    monkeypatch.setattr(backbone, "tail", failing_tail)
    clip.train()
    before = {name: p.detach().clone() for name, p in clip.named_parameters()}
    hooks = _hook_count(clip)
    ids, mask = make_texts([5], seed=9)
    with pytest.raises(RuntimeError, match="boom"):
        M2IB(backbone, M2IBConfig(vision_layer=1, text_layer=1)).attribute(make_images(1), ids, mask)
    assert all(torch.equal(p, before[name]) for name, p in clip.named_parameters())
    assert all(p.grad is None for p in clip.parameters())
    assert _hook_count(clip) == hooks
    assert all(m.training for m in clip.modules())
    clip.eval()


def test_pooled_row_tail_equals_full_tail(clip):
    ids, mask = make_texts([3, 9], seed=10)
    inputs = {"image": {"pixel_values": make_images(2)}, "text": {"input_ids": ids, "attention_mask": mask}}
    fast, full = as_backbone(clip), as_backbone(clip, pooled_row_only=False)
    for modality in ("image", "text"):
        for layer in range(4):
            state = fast.prefix(modality, inputs[modality], layer)
            torch.testing.assert_close(
                fast.tail(modality, state.hidden, state), full.tail(modality, state.hidden, state), atol=1e-6, rtol=1e-6
            )
            torch.testing.assert_close(fast.tail(modality, state.hidden, state), fast.embed(modality, inputs[modality]), atol=1e-5, rtol=0)


def test_legacy_eos_id_two_pools_at_largest_id():
    model = tiny_clip(seed=3, eos_token_id=2)
    backbone = as_backbone(model)
    ids, mask = make_texts([4, 6], seed=1)  # EOS is 99, the largest id: the legacy argmax rule finds it
    assert backbone.pool_index(ids).tolist() == [3, 5]
    state = backbone.prefix("text", {"input_ids": ids, "attention_mask": mask}, 1)
    torch.testing.assert_close(
        backbone.tail("text", state.hidden, state),
        backbone.embed("text", {"input_ids": ids, "attention_mask": mask}),
        atol=1e-5, rtol=0,
    )


def test_engine_imports_without_lightning():
    import subprocess
    import sys

    code = "import sys, m2ib_lightning; assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert m2ib_lightning.attribute is attribute
