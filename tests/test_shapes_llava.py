"""The shapes LLaVA recipe: a short fit saves a LLaVA that loads through from_pretrained, whose processor expands the
image placeholder, and that the answer adapter serves."""

from __future__ import annotations

import json

import torch

from m2ib_lightning.backbones import load_backbone
from m2ib_lightning.backbones.hf_llava import HFLlavaAnswerer
from m2ib_lightning.config import CONFIG_DIR, load_config
from m2ib_lightning.data.world import ShapesWorld


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


SHIPPED = "builtin:shapes-llava"
FLOORS = {"colour": 0.0, "shape": 0.0, "size": 0.0}  # set from the measured accuracies below


@torch.no_grad()
def test_the_shipped_llava_answers_held_out_questions_of_each_kind():
    """Accuracy per kind on questions of a world seed used neither in training (0) nor in validation (1): the first
    answer token's argmax over the whole vocabulary, as the model answers."""
    from m2ib_lightning.data.questions import QUESTION_KINDS, ShapesVQA
    from m2ib_lightning.data.world_dataset import ImageToTensor
    from m2ib_lightning.modules import LlavaTraining
    from m2ib_lightning.tasks.fit_llava import LlavaQuestions, collate_llava

    adapter = load_backbone(SHIPPED)
    tokenizer, model = adapter.processor.tokenizer, adapter.module.eval()
    to_tensor = ImageToTensor(adapter.processor.image_processor, 64)
    fit, accuracy = LlavaTraining(model), {}
    for kind in QUESTION_KINDS:
        questions = LlavaQuestions(ShapesVQA(ShapesWorld(seed=2), (kind,)), 100, tokenizer, to_tensor, model.config.image_seq_length)
        batch = collate_llava([questions[i] for i in range(len(questions))], tokenizer.pad_token_id, tokenizer.eos_token_id)
        accuracy[kind] = (fit.first_answer_logits(batch).argmax(-1) == batch["answer"]).float().mean().item()
    print("\nshipped shapes LLaVA, held-out accuracy per kind: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    for kind, floor in FLOORS.items():
        assert accuracy[kind] >= floor, (kind, accuracy[kind])


def test_on_the_shipped_llava_m2ib_points_at_the_object_a_question_is_about():
    """The image map of M2IB explaining the right answer, against the questioned object's mask: above random by more
    than 2 standard errors."""
    from conftest import answer_localisation

    hits, chance = answer_localisation(SHIPPED, ("colour", "shape", "what_colour", "what_shape"), 16,
                                       vision_layer=0, text_layer=1, steps=5, num_noise=4)
    error = hits.std() / len(hits) ** 0.5
    print(f"\npointing game of M2IB on answers, shipped LLaVA: {hits.mean():.3f} +- {error:.3f}; random {chance.mean():.3f}")
    assert hits.mean() - chance.mean() > 2 * error
