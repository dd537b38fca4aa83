"""The amortised explainer of answer models: its features are the exact fit's, its maps have the exact result's
layout and zeros, a sample's maps do not depend on its batch, checkpoints load and refuse what they were not
trained for; trained on an exact attribute_vqa run and used (audited) in one through train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_runs_agree, make_images, make_texts, tiny_clip, train_main
from test_answers import ANSWER_FAMILIES
from test_edges_runs import _main
from test_explainer import _train
from test_vqa_runs import FAMILIES, SIZE
from m2ib_lightning.amortised import AmortisedAnswerM2IB, ExplainerNetwork, answer_features, new_answer_explainer, new_explainer
from m2ib_lightning.answers import answer_layers, attribute_answers, replaced_output
from m2ib_lightning.engine import M2IBConfig
from m2ib_lightning.results import index_entries, read_attributions

SETTINGS = M2IBConfig(vision_layer=0, text_layer=-1, steps=2, num_noise=2)


def _explainer(model, example, seed: int = 3):
    batch = model.answer_batch(**example)
    return new_answer_explainer(model, SETTINGS, batch, width=16, depth=1, heads=2, seed=seed)


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("family", list(ANSWER_FAMILIES))
def test_the_features_are_the_blocks_outputs_the_exact_fit_reads_and_the_maps_have_its_layout(family):
    factory, make_inputs = ANSWER_FAMILIES[family]
    model, example = factory(), make_inputs()
    batch = model.answer_batch(**example)
    layers = answer_layers(model, SETTINGS)
    with torch.no_grad():
        model.answer_log_likelihood(batch, 1)
    hooks = _hooks(model.module)  # transformers' own, installed at the first forward (it records hidden states with hooks)
    features = answer_features(model, batch, layers)
    for m in ("image", "text"):  # each block alone, as fit_answer_bottleneck captures it
        captured = []
        with torch.no_grad(), replaced_output(model.blocks(m)[layers[m]], capture=captured):
            model.answer_log_likelihood(batch, 1)
        assert torch.equal(features.hidden[m], model.bottleneck_tokens(m, batch, captured[0]))
        assert torch.equal(features.positions[m], batch.positions[m].bool())
    assert _hooks(model.module) == hooks

    predicted = AmortisedAnswerM2IB(model, _explainer(model, example)).attribute(**example)
    exact = attribute_answers(model, **example, config=SETTINGS, seed=0)
    for name in ("image_capacity", "image_patch_capacity", "text_capacity", "image_maps", "image_sizes"):
        assert getattr(predicted, name).shape == getattr(exact, name).shape, name
    assert torch.equal(predicted.text_positions, exact.text_positions)
    assert (predicted.text_capacity[~exact.text_positions] == 0).all()  # padding and image tokens, as the exact fit's
    assert (predicted.text_capacity[exact.text_positions] > 0).all()
    assert (predicted.image_capacity[~batch.positions["image"].bool()] == 0).all()
    assert (predicted.image_capacity[batch.positions["image"].bool()] > 0).all() and predicted.image_patch_capacity.std() > 0
    assert predicted.image_fit.isnan().all() and _hooks(model.module) == hooks


@pytest.mark.parametrize("family", list(ANSWER_FAMILIES))
def test_a_question_gets_the_same_amortised_maps_alone_and_in_its_batch(family):
    factory, make_inputs = ANSWER_FAMILIES[family]
    model, example = factory(), make_inputs()
    explainer = AmortisedAnswerM2IB(model, _explainer(model, example))
    together = explainer.attribute(**example)
    for b in range(len(example["input_ids"])):
        one = model.sample_inputs(example, b)
        ids, mask = one["input_ids"], one["attention_mask"]
        keep = mask[0].bool()
        one["input_ids"], one["attention_mask"] = ids[:, keep], mask[:, keep]  # its own prompt, no padding
        answers = one["answer_mask"][0].bool()
        one["answer_ids"], one["answer_mask"] = one["answer_ids"][:, answers], one["answer_mask"][:, answers]
        alone = explainer.attribute(**one)
        torch.testing.assert_close(alone.text_capacity[0], together.text_capacity[b][keep], atol=1e-5, rtol=1e-5)
        tokens = alone.image_capacity.shape[1]
        torch.testing.assert_close(alone.image_capacity[0], together.image_capacity[b, :tokens], atol=1e-5, rtol=1e-5)
        assert (together.image_capacity[b, tokens:] == 0).all()


@pytest.mark.parametrize("family", list(ANSWER_FAMILIES))
def test_bf16_runs_the_model_and_the_network_in_bfloat16_with_float32_maps_close_to_float32s(family):
    factory, make_inputs = ANSWER_FAMILIES[family]
    model, example = factory(), {k: v.float() if v.is_floating_point() else v for k, v in make_inputs().items()}
    model.module.float()
    network = _explainer(model, example).float()
    dtypes = []
    handle = network.blocks.layers[0].linear1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    try:
        full = AmortisedAnswerM2IB(model, network, m2ib=SETTINGS).attribute(**example)
        low = AmortisedAnswerM2IB(model, network, m2ib=M2IBConfig(**{**vars(SETTINGS), "precision": "bf16"})).attribute(**example)
    finally:
        handle.remove()
    assert dtypes == [torch.float32, torch.bfloat16]
    for name in ("image_capacity", "text_capacity"):
        assert getattr(low, name).dtype == torch.float32 and not torch.equal(getattr(low, name), getattr(full, name))
        torch.testing.assert_close(getattr(low, name), getattr(full, name), atol=0.02, rtol=0.05)  # zero where float32's is


def test_a_saved_answer_explainer_loads_with_equal_maps_and_refuses_what_it_was_not_trained_for(tmp_path):
    factory, make_inputs = ANSWER_FAMILIES["hf_llava"]
    model, example = factory(), make_inputs()
    network = _explainer(model, example)
    network.save_pretrained(tmp_path / "answers")
    loaded = ExplainerNetwork.from_pretrained(tmp_path / "answers")
    assert type(loaded).__name__ == "AnswerExplainerNetwork"
    a = AmortisedAnswerM2IB(model, network).attribute(**example)
    b = AmortisedAnswerM2IB(model, tmp_path / "answers", m2ib=SETTINGS).attribute(**example)
    assert torch.equal(a.image_maps, b.image_maps) and torch.equal(a.text_maps, b.text_maps)
    with pytest.raises(ValueError, match="the model given has other weights"):
        AmortisedAnswerM2IB(factory(seed=1), tmp_path / "answers")
    with pytest.raises(ValueError, match=r"m2ib settings text_layer=0 \(explainer: -1\)"):
        AmortisedAnswerM2IB(model, tmp_path / "answers", m2ib=M2IBConfig(vision_layer=0, text_layer=0, steps=2, num_noise=2))
    clip = tiny_clip(seed=5)
    (ids, mask) = make_texts([5, 3], seed=1)
    new_explainer(clip, SETTINGS, make_images(2, seed=1), ids, mask, width=16, depth=1, heads=2).save_pretrained(tmp_path / "pairs")
    with pytest.raises(ValueError, match="this explainer explains pairs and the run explains answers"):
        AmortisedAnswerM2IB(model, tmp_path / "pairs")


def _vqa_args(out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs/attribute_shapes_vqa.yaml"), f"output_dir={out}", f"model.name_or_path={checkpoint}",
            f"world.image_size={SIZE}", "m2ib.vision_layer=0", "m2ib.text_layer=1", "m2ib.steps=2", "m2ib.num_noise=2",
            "data.batch_size=4", "export.overlays=0", "export.samples_per_shard=4", "trainer.enable_progress_bar=false", *extra]


@pytest.mark.parametrize("family", ["hf_llava", "hf_qwen2_vl"])
def test_an_explainer_trained_on_an_exact_vqa_run_explains_and_audits_a_vqa_run(tmp_path, capsys, family):
    from m2ib_lightning.backbones import load_backbone
    from m2ib_lightning.data.explainer import AnswerExplainerExamples, ExactTargets
    from m2ib_lightning.tasks.common import source_of
    from m2ib_lightning.tasks.fit_explainer import exact_run_config

    checkpoint = FAMILIES[family](tmp_path / family)
    exact = tmp_path / "exact"
    assert train_main(*_vqa_args(exact, checkpoint, "data.num_samples=12")) == 0
    model = load_backbone(str(checkpoint))
    entries = {e["id"]: e for e in index_entries(exact)}
    targets = ExactTargets.build(exact, tmp_path / "targets.sqlite")
    examples = list(AnswerExplainerExamples(source_of(exact_run_config(exact), questions=True), model, targets,
                                            held_out_fraction=0.25, split="train"))
    records = {r.id: r for r in read_attributions(exact)}
    assert examples
    for example in examples:  # the answer the exact run explained, its capacities
        assert example["answer_ids"] == model.answer_inputs(entries[example["id"]]["answer"])
        assert torch.equal(example["target_text"], records[example["id"]].text_capacity)

    fit = tmp_path / "fit"
    assert train_main(str(ROOT / "configs/fit_explainer.yaml"), f"exact_run={exact}", f"output_dir={fit}", "data.batch_size=4",
                      "data.held_out_fraction=0.25", "network.width=16", "network.depth=1", "network.heads=2",
                      "trainer.max_steps=4", "trainer.val_check_interval=2", "optim.warmup_steps=1",
                      "trainer.enable_progress_bar=false") == 0
    saved = json.loads((fit / "explainer" / "config.json").read_text())
    assert saved["kind"] == "answers" and saved["training"]["steps"] == 4
    assert 0 <= saved["training"]["held_out"]["val/image_peak_in_top"] <= 1

    amortised = tmp_path / "amortised"
    assert _main(capsys, *_vqa_args(amortised, checkpoint, "data.num_samples=8", f"m2ib.explainer={fit / 'explainer'}",
                                    "m2ib.audit_every=2")).returncode == 0
    written = {r.id: r for r in read_attributions(amortised)}
    assert len(written) == 8
    audited = [e for e in index_entries(amortised) if "audit" in e]
    assert 0 < len(audited) < 8 and all(-1 <= e["audit"]["image_spearman"] <= 1 for e in audited)
    assert all(e["image_fit"] is None for e in index_entries(amortised))
    assert json.loads((amortised / "summary.json").read_text())["audit"]["samples"] == len(audited)
    from m2ib_lightning.shapes.questions import ShapesVQA
    from m2ib_lightning.shapes.world import ShapesWorld

    vqa = ShapesVQA(ShapesWorld(seed=2, image_size=SIZE, max_objects=3, noise=0.03),
                    ("colour", "shape", "size", "what_colour", "what_shape", "what_size"))
    sample = vqa.sample(1)  # the run's maps are the front door's
    inputs = model.question_inputs(sample.sample.image, sample.question.text)
    ids, images = torch.tensor([inputs.ids]), model.join_inputs([inputs.image])
    answer = torch.tensor([model.answer_inputs(sample.question.answer)])
    expected = AmortisedAnswerM2IB(model, fit / "explainer").attribute(images.pop("pixel_values"), ids, torch.ones_like(ids), answer,
                                                                       **images)
    torch.testing.assert_close(written[sample.id].image_capacity, expected.image_patch_capacity[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(written[sample.id].text_capacity, expected.text_capacity[0], atol=1e-5, rtol=1e-5)

    evaluation = tmp_path / "eval"
    result = _main(capsys, str(ROOT / "configs/evaluate_shapes_vqa.yaml"), f"model.name_or_path={checkpoint}",
                   f"world.image_size={SIZE}", f"output_dir={evaluation}", "data.num_samples=2", "data.batch_size=2",
                   "m2ib.vision_layer=0", "m2ib.text_layer=1", "m2ib.steps=2", "m2ib.num_noise=2",
                   "methods=[m2ib,m2ib_amortised,random]", f"baselines.m2ib_amortised.explainer={fit / 'explainer'}",
                   "metrics.steps=2", "export.grid_samples=0", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr
    row = json.loads((evaluation / "summary.json").read_text())["methods"]["m2ib_amortised"]  # beside exact M2IB
    assert row["samples"] == 2 and 0 <= row["image_deletion_auc"][0] <= 1 and row["text_deletion_auc"][0] is not None


def test_an_audited_amortised_vqa_run_on_two_processes_gives_the_maps_and_audits_of_one(tmp_path, capsys):
    from m2ib_lightning.backbones import load_backbone
    from m2ib_lightning.shapes.world import ShapesWorld

    checkpoint = FAMILIES["hf_llava"](tmp_path / "llava")
    model = load_backbone(str(checkpoint))
    question = model.question_inputs(ShapesWorld(seed=0, image_size=SIZE).sample(0).image, "what colour is the circle?")
    ids, images = torch.tensor([question.ids]), model.join_inputs([question.image])
    answer = torch.tensor([model.answer_inputs("red")])
    batch = model.answer_batch(images.pop("pixel_values"), ids, torch.ones_like(ids), answer, torch.ones_like(answer), **images)
    settings = M2IBConfig(vision_layer=0, text_layer=1, beta=0.1, steps=2, lr=1.0, num_noise=2)  # as _vqa_args has them
    new_answer_explainer(model, settings, batch, width=16, depth=1, heads=2).save_pretrained(tmp_path / "explainer")
    args = lambda out: _vqa_args(out, checkpoint, "data.num_samples=10", f"m2ib.explainer={tmp_path / 'explainer'}",  # noqa: E731
                                 "m2ib.audit_every=3")
    assert _main(capsys, *args(tmp_path / "one")).returncode == 0
    _train(*args(tmp_path / "two"), "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    assert_runs_agree(tmp_path / "one", tmp_path / "two", 10, ("image_capacity", "text_capacity"))
