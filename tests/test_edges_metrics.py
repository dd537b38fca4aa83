"""Metric definitions, stated and selectable, checked by hand; methods on frozen models; OpenAI-style tokenizers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_images, make_texts, tiny_clip
from m2ib_lightning.baselines import METHODS, make_method, replacement_token
from m2ib_lightning.metrics import ConfidenceDrop, PointingGame, confidence_drop, keep_text, pointing_game
from m2ib_lightning.metrics.faithfulness import blurred, rise_kernel
from m2ib_lightning.metrics.mean import MeanOverSamples


def _map_with_peaks(*cells: tuple[int, int], size: int = 8) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    for row, col in cells:
        image[0, row, col] = 1.0
    return image


def test_pointing_game_ties_share_and_any():
    maps = _map_with_peaks((0, 0), (0, 1), (7, 7), (7, 6))  # four tied peaks
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0, 0] = True  # one of them inside
    assert pointing_game(maps, mask).item() == pytest.approx(0.25)
    assert pointing_game(maps, mask, ties="any").item() == 1.0
    assert PointingGame(ties="any")._per_sample(maps, mask).item() == 1.0


def test_pointing_game_tolerance_counts_a_peak_that_close_to_the_mask():
    maps = _map_with_peaks((4, 4))
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 4, 6] = True  # two pixels to the right of the peak
    assert [pointing_game(maps, mask, tolerance=t).item() for t in (0, 1, 2)] == [0.0, 0.0, 1.0]
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 6, 6] = True  # diagonal: sqrt(8) = 2.83 pixels away
    assert [pointing_game(maps, mask, tolerance=t).item() for t in (2, 3)] == [0.0, 1.0]


def test_pointing_game_per_class_mean_is_the_mean_of_class_hit_rates():
    metric = PointingGame(num_classes=3)
    metric.update(scores=torch.tensor([1.0, 1.0, 1.0, 0.0]), classes=torch.tensor([0, 0, 0, 1]))
    assert metric.compute().item() == pytest.approx(0.75)  # over samples
    assert metric.per_class_mean().item() == pytest.approx(0.5)  # class 0: 1, class 1: 0; class 2 unseen
    with pytest.raises(ValueError, match="needs the class of each sample"):
        metric.update(scores=torch.tensor([1.0]))
    metric.update(scores=torch.tensor([0.0, 0.0]), classes=torch.tensor([-1, 2]))  # -1: no class, counts per sample only
    assert metric.compute().item() == pytest.approx(3 / 6) and metric.per_class_mean().item() == pytest.approx(1 / 3)
    assert metric.class_rates().tolist()[2] == 0.0 and metric.class_counts.tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="below num_classes=3"):
        metric.update(scores=torch.tensor([1.0]), classes=torch.tensor([3]))


def test_confidence_drop_absolute_and_relative_by_hand():
    clean, perturbed = torch.tensor([0.5, 0.2, -0.1]), torch.tensor([0.4, 0.3, -0.2])
    assert confidence_drop(clean, perturbed).tolist() == pytest.approx([10.0, 0.0, 10.0])
    relative = confidence_drop(clean, perturbed, relative=True)
    assert relative[:2].tolist() == pytest.approx([20.0, 0.0]) and math.isnan(relative[2].item())  # undefined for s <= 0
    metric = ConfidenceDrop(relative=True)
    metric.update(clean[:2], perturbed[:2])
    assert metric.compute().item() == pytest.approx(10.0)


def test_a_nan_score_shows_unless_the_metric_is_told_otherwise():
    scores = torch.tensor([1.0, float("nan"), 3.0])
    propagate = MeanOverSamples()
    propagate.update(scores=scores)
    assert math.isnan(propagate.compute().item())
    ignore = MeanOverSamples(nan_strategy="ignore")
    ignore.update(scores=scores)
    assert ignore.compute().item() == 2.0 and ignore.samples() == 2
    with pytest.warns(UserWarning, match="1 of 3 scores are NaN"):
        MeanOverSamples(nan_strategy="warn").update(scores=scores)
    with pytest.raises(RuntimeError, match="1 of 3 scores are NaN"):
        MeanOverSamples(nan_strategy="error").update(scores=scores)
    one = MeanOverSamples()
    one.update(scores=torch.tensor([4.0]))
    assert one.compute().item() == 4.0 and math.isnan(one.standard_error().item())


def test_the_blur_baseline_is_rises_own_kernel():
    size, sigma, radius = 11, 5.0, 20
    delta = np.zeros(size)
    delta[size // 2] = 1.0
    padded = np.pad(delta, radius, mode="symmetric")  # numpy's symmetric = SciPy's reflect border
    taps = np.exp(-0.5 * np.arange(-radius, radius + 1) ** 2 / sigma**2)
    taps /= taps.sum()
    line = np.array([(padded[i: i + 2 * radius + 1] * taps).sum() for i in range(size)])
    np.testing.assert_allclose(rise_kernel().numpy(), np.outer(line, line), rtol=0, atol=1e-15)
    assert rise_kernel().sum().item() == pytest.approx(1.0, abs=1e-12)
    flat = torch.full((1, 3, 32, 32), 2.0)
    out = blurred(flat)
    assert out.shape == flat.shape
    torch.testing.assert_close(out[..., 5:-5, 5:-5], flat[..., 5:-5, 5:-5])  # the kernel keeps a flat interior
    assert out[0, 0, 0, 0] < 2.0  # zero padding, as RISE's conv2d: the border darkens


def test_chefer_start_layer_takes_blocks_from_there_on():
    model = tiny_clip(seed=3).double()
    pixels, (ids, mask) = make_images(2, seed=1).double(), make_texts([5, 7], seed=1)
    seeds, special = torch.tensor([0, 1]), torch.zeros_like(ids, dtype=torch.bool)
    maps = {start: make_method("chefer", model, start_layer=start).attribute(pixels, ids, mask, seeds, special)
            for start in (0, -1, 3)}
    torch.testing.assert_close(maps[-1].image, maps[3].image, rtol=0, atol=0)  # 4 blocks: -1 is block 3
    assert (maps[0].image - maps[-1].image).abs().max() > 1e-3
    with pytest.raises(ValueError, match="start_layer=4 is out of range"):
        make_method("chefer", model, start_layer=4).attribute(pixels, ids, mask, seeds, special)


SETTINGS = {"m2ib": {"vision_layer": 0, "text_layer": 0, "steps": 2, "num_noise": 2},
            "integrated_gradients": {"steps": 3, "replacement_id": 0}, "rise": {"masks": 16, "chunk": 8}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_on_a_frozen_model_gives_the_maps_of_the_unfrozen_one(name):
    pixels, (ids, mask) = make_images(2, seed=4), make_texts([5, 8], seed=4)
    seeds, special = torch.tensor([3, 4]), torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    live, frozen = tiny_clip(seed=6), tiny_clip(seed=6).requires_grad_(False)  # what LightningModule.freeze() does
    from test_evaluation import settings_for

    settings = lambda model: settings_for(name, model, pixels, ids, mask) if name == "m2ib_amortised" else SETTINGS.get(name, {})  # noqa: E731
    a = make_method(name, live, **settings(live)).attribute(pixels, ids, mask, seeds, special)
    b = make_method(name, frozen, **settings(frozen)).attribute(pixels, ids, mask, seeds, special)
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-6)
    if a.text is not None:
        torch.testing.assert_close(a.text, b.text, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.fixture(scope="module")
def openai_style_bundle(tmp_path_factory):
    """A CLIP whose tokenizer pads (and marks unknown words) with its end-of-text token, the last id, as OpenAI's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPProcessor, PreTrainedTokenizerFast

    from m2ib_lightning.shapes.world import vocabulary
    from m2ib_lightning.shapes.models.shapes_clip import build_image_processor, build_shapes_clip

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab = {w: i for i, w in enumerate([*vocabulary(), bos, eos])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos,
                                        model_max_length=16)
    path = tmp_path_factory.mktemp("openai-style-clip")
    build_shapes_clip(tokenizer, width=32, layers=2, heads=2, projection_dim=16, seed=2).save_pretrained(path)
    CLIPProcessor(image_processor=build_image_processor(64), tokenizer=tokenizer).save_pretrained(path)
    return path


def test_an_openai_style_tokenizer_gets_a_neutral_id_and_perturbed_captions_pool_where_they_did(openai_style_bundle):
    from m2ib_lightning.backbones import load_backbone
    from m2ib_lightning.evaluation import Evaluator, MetricSettings

    backbone = load_backbone(str(openai_style_bundle))
    tokenizer = backbone.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == len(tokenizer) - 1
    neutral = Evaluator(backbone).replacement_id()
    assert neutral not in backbone.structural_token_ids and neutral == backbone.neutral_token_id
    ids = torch.tensor([backbone.text_inputs("a red circle and a blue square").ids])
    mask = torch.ones_like(ids)
    words = torch.ones_like(ids, dtype=torch.bool)
    words[0, 0] = words[0, -1] = False
    kept = keep_text(ids, torch.linspace(0, 1, ids.shape[1])[None], words, neutral)
    assert (kept != ids).sum() >= 3  # words were replaced
    pool = lambda x: backbone.prefix("text", {"input_ids": x, "attention_mask": mask}, 0).pool_index  # noqa: E731
    assert pool(kept).tolist() == pool(ids).tolist() == [ids.shape[1] - 1]
    by_pad = keep_text(ids, torch.linspace(0, 1, ids.shape[1])[None], words, tokenizer.pad_token_id)
    assert pool(by_pad).tolist() != pool(ids).tolist()  # what replacing by the padding id did: pooling moved
    with pytest.raises(ValueError, match="is a structural token"):
        Evaluator(backbone, MetricSettings(replacement_id=tokenizer.eos_token_id)).replacement_id()
    with pytest.raises(ValueError, match="is a structural token"):
        replacement_token(backbone, tokenizer.bos_token_id)


def test_an_evaluation_with_a_structural_replacement_id_exits_2(openai_style_bundle, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    eos = len(__import__("json").loads((openai_style_bundle / "tokenizer.json").read_text())["model"]["vocab"]) - 1
    proc = subprocess.run([sys.executable, "train.py", "configs/evaluate_shapes.yaml", f"output_dir={tmp_path / 'x'}",
                           f"model.name_or_path={openai_style_bundle}", f"metrics.replacement_id={eos}",
                           "m2ib.vision_layer=0", "m2ib.text_layer=0"], cwd=ROOT, capture_output=True, text=True)
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: metrics.replacement_id:") and "structural token" in last
    assert not (tmp_path / "x").exists()
