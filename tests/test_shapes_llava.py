"""The shapes LLaVA recipe: a short fit saves a LLaVA that loads through from_pretrained, whose processor expands the
image placeholder, and that the answer adapter serves."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from m2ib_lightning.backbones import load_backbone
from m2ib_lightning.backbones.hf_llava import HFLlavaAnswerer
from m2ib_lightning.config import CONFIG_DIR, load_config
from m2ib_lightning.shapes.world import ShapesWorld


def test_a_short_fit_saves_a_llava_that_loads_and_answers(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from m2ib_lightning.tasks.fit_llava import run

    cfg = load_config(CONFIG_DIR / "fit_shapes_llava.yaml", [
        f"output_dir={tmp_path}", "data.train_samples=64", "data.batch_size=8", "data.val_samples=16", "data.num_workers=0",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "model.width=32", "model.layers=1", "model.heads=2",
        "trainer.enable_progress_bar=false",
    ])
    saved = run(cfg)
    summary = json.loads((tmp_path / "fit_summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["heldout_accuracy"]) <= {"colour", "shape", "size", "side", "place",
                                                                           "what_colour", "what_shape", "what_size"}
    model = LlavaForConditionalGeneration.from_pretrained(saved)
    processor = AutoProcessor.from_pretrained(saved)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]}],
        add_generation_prompt=True)
    assert prompt == "<s>user: <image> what colour is the circle? assistant:"
    inputs = processor(images=ShapesWorld(seed=1).sample(0).image, text=prompt, return_tensors="pt")
    image_token = model.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == 64  # one per patch of 8 x 8, CLS dropped
    assert model.config.vision_feature_layer == -1 and model.config.text_config.num_hidden_layers == 1
    adapter = load_backbone(str(saved))
    assert isinstance(adapter, HFLlavaAnswerer)
    answer = processor.tokenizer("red", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        batch = adapter.answer_batch(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], answer,
                                     torch.ones_like(answer))
        logits = model(**inputs).logits[0, -1]
        assert torch.allclose(adapter.answer_log_likelihood(batch), torch.log_softmax(logits, -1)[answer[0, 0]], atol=1e-5)
    # init_from: training goes on from the saved model (its architecture, tokenizer and weights: at lr 1e-20 they stay)
    again = load_config(CONFIG_DIR / "fit_shapes_llava.yaml", [
        f"output_dir={tmp_path / 'again'}", f"init_from={saved}", "data.train_samples=16", "data.batch_size=8",
        "data.val_samples=8", "data.num_workers=0", "trainer.max_steps=1", "trainer.val_check_interval=1",
        "model.width=64", "optim.lr=1e-20", "optim.weight_decay=0", "trainer.enable_progress_bar=false",
    ])
    continued = LlavaForConditionalGeneration.from_pretrained(run(again))
    assert continued.config.text_config.hidden_size == 32
    for (name, before), after in zip(model.state_dict().items(), continued.state_dict().values()):
        torch.testing.assert_close(after, before, atol=1e-12, rtol=0, msg=name)
    with pytest.raises(ValueError, match="init_from=.* sees 64 px images, the world has 32"):
        run(load_config(CONFIG_DIR / "fit_shapes_llava.yaml", [f"output_dir={tmp_path / 'other'}", f"init_from={saved}",
                                                                "world.image_size=32"]))


def test_a_conversation_sample_asks_its_first_question_as_the_model_is_used_then_answers_each_turn():
    from m2ib_lightning.shapes.datasets import ImageToTensor
    from m2ib_lightning.shapes.models.shapes_llava import build_llava_processor, build_llava_tokenizer
    from m2ib_lightning.shapes.questions import ShapesVQA
    from m2ib_lightning.tasks.fit_llava import IGNORE, LlavaQuestions, collate_llava

    tokenizer = build_llava_tokenizer()
    to_tensor = ImageToTensor(build_llava_processor(tokenizer, 64, 8).image_processor, 64)
    vqa = ShapesVQA(ShapesWorld(seed=2))
    single = LlavaQuestions(vqa, 8, tokenizer, to_tensor, 64)
    talk = LlavaQuestions(vqa, 8, tokenizer, to_tensor, 64, turns=4)
    scene, questions = vqa.conversation(3, 4)
    assert len({q.text for q in questions}) == len(questions) >= 2 and vqa.conversation(3, 4)[1] == questions
    item = talk[3]
    eos, ids, labels = tokenizer.eos_token_id, item["ids"], item["labels"]
    ends = [i for i, t in enumerate(ids) if t == eos]
    assert len(ends) == len(questions) and ends[-1] == len(ids) - 1
    answers = [tokenizer.convert_tokens_to_ids(q.answer) for q in questions]
    assert [ids[e - 1] for e in ends] == answers  # each turn: its answer word, then </s>
    assert [(i, t) for i, t in enumerate(labels) if t != IGNORE] == [p for e in ends for p in ((e - 1, ids[e - 1]), (e, eos))]
    first = tokenizer(f"<s>user: {'<image>' * 64} {questions[0].text} assistant:", add_special_tokens=False)["input_ids"]
    assert ids[:len(first)] == first  # the first turn is the prompt the model is asked with
    later = tokenizer(f"user: {questions[1].text} assistant:", add_special_tokens=False)["input_ids"]
    assert ids[ends[0] + 1: ends[0] + 1 + len(later)] == later
    batch = collate_llava([single[0], item], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ids)) and int(batch["attention_mask"][0].sum()) == len(single[0]["ids"])
    assert bool((batch["labels"][0, :-2] == IGNORE).all()) and batch["labels"][0, -2:].tolist() == single[0]["ids"][-2:]


SHIPPED = "builtin:shapes-llava"
QUESTIONS_PER_KIND = 150
#: held-out floors: the issue's targets (measured on these 150 questions per kind: colour 1.000, shape 0.953, size
#: 0.987, side 0.847, place 0.920)
FLOORS = {"colour": 0.95, "shape": 0.95, "size": 0.90, "side": 0.80, "place": 0.80}


def test_the_shipped_llava_is_a_hub_layout_directory_under_16_mb():
    from m2ib_lightning.backbones import resolve_model_path
    from m2ib_lightning.backbones.loading import SHIPPED_MODELS

    path = SHIPPED_MODELS["shapes-llava"][0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir()) < 16 * 2**20
    assert resolve_model_path(SHIPPED) == str(path)


@torch.no_grad()
def test_the_shipped_llava_answers_held_out_questions_per_kind():
    """Held-out accuracy per kind (world seed 2, used neither in training nor validation; the first answer token's
    argmax over the whole vocabulary, the prompt the model's chat template)."""
    import sys

    from conftest import ROOT
    from m2ib_lightning.shapes.questions import QUESTION_KINDS, ShapesVQA

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_answers import question_batch

    model = load_backbone(SHIPPED)
    world, accuracy = ShapesWorld(seed=2), {}
    for kind in QUESTION_KINDS:
        items = [ShapesVQA(world, (kind,)).sample(i) for i in range(QUESTIONS_PER_KIND)]
        pixels, prompts, answers = question_batch(model, items)
        last = prompts["attention_mask"].sum(1) - 1  # right-padded: each prompt's own last token
        logits = model.module(pixel_values=pixels, **prompts).logits[torch.arange(len(items)), last]
        accuracy[kind] = (logits.argmax(-1) == answers["input_ids"][:, 0]).float().mean().item()
    print("\nshipped shapes LLaVA, held-out accuracy per kind: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    for kind, floor in FLOORS.items():
        assert accuracy[kind] >= floor, (kind, accuracy[kind])


def test_on_the_shipped_llava_m2ib_points_at_the_object_a_question_is_about():
    """The image map of M2IB explaining the right answer, against the questioned object's mask: above random by more
    than two standard errors."""
    from conftest import answer_localisation

    hits, chance = answer_localisation(SHIPPED, ("colour", "shape", "what_colour", "what_shape"), 8,
                                       vision_layer=0, text_layer=1, steps=10, num_noise=10)
    error = hits.std() / len(hits) ** 0.5
    print(f"\npointing game of M2IB on answers, shipped LLaVA: {hits.mean():.3f} +- {error:.3f}; random {chance.mean():.3f}")
    assert hits.mean() - chance.mean() > 2 * error


def test_the_position_loss_adds_each_image_tokens_row_and_column_and_trains_only_a_head_of_the_fit():
    """model.position_loss: the answers' loss plus w x (cross-entropy of each patch's row + column) read from the
    projector's output by the fit's own linear head, which the optimizer trains and the saved model does not hold."""
    from m2ib_lightning.modules import LlavaTraining
    from m2ib_lightning.shapes.models.shapes_llava import build_llava_tokenizer, build_shapes_llava

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    model = build_shapes_llava(build_llava_tokenizer(), vision, width=32, layers=1, heads=2, vision_feature_layer=-1, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), model.config.image_token_id), torch.tensor([[9, 10, 11]])], 1)
    ids = ids.expand(2, -1).clone()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(ids.shape[1]).expand_as(ids),
             "pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.full_like(ids, -100)}
    batch["labels"][:, -1] = 11
    plain = LlavaTraining(model).training_step(batch, 0)
    fit = LlavaTraining(model, position_loss=0.5)
    assert LlavaTraining(model).position_head is None
    taken = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: taken.append(out))
    try:
        total = fit.training_step(batch, 0)
    finally:
        handle.remove()
    logits = fit.position_head(taken[0])  # (2, 16 patches, 4 rows + 4 columns)
    cells = torch.arange(16)
    rows = sum(torch.nn.functional.cross_entropy(logits[b, :, :4], cells // 4) for b in range(2)) / 2
    cols = sum(torch.nn.functional.cross_entropy(logits[b, :, 4:], cells % 4) for b in range(2)) / 2
    torch.testing.assert_close(total, plain + 0.5 * (rows + cols), atol=1e-6, rtol=0)
    columns_only = LlavaTraining(model, position_loss=0.5, position_axes=("col",))
    taken.clear()
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: taken.append(out))
    try:
        total = columns_only.training_step(batch, 0)
    finally:
        handle.remove()
    logits = columns_only.position_head(taken[0])  # (2, 16 patches, 4 columns)
    cols = sum(torch.nn.functional.cross_entropy(logits[b], cells % 4) for b in range(2)) / 2
    torch.testing.assert_close(total, plain + 0.5 * cols, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="position_axes"):
        LlavaTraining(model, position_loss=0.5, position_axes=("diagonal",))
    # position_loss_steps: the loss in the first steps only, the answers' loss alone after
    early = LlavaTraining(model, position_loss=0.5, position_axes=("col",), position_loss_steps=3)
    early.position_head.load_state_dict(columns_only.position_head.state_dict())
    for step, expected in ((0, total), (2, total), (3, plain), (7, plain)):
        with mock.patch.object(LlavaTraining, "global_step", new_callable=mock.PropertyMock, return_value=step):
            torch.testing.assert_close(early.training_step(batch, 0), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="position_loss_steps"):
        LlavaTraining(model, position_loss=0.5, position_loss_steps=-1)
    assert not any(k.startswith("position_head") for k in model.state_dict())  # what save_pretrained writes
    fit.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimizer = fit.configure_optimizers()["optimizer"]
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in fit.position_head.parameters()} <= trained
