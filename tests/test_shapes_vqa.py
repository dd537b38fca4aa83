"""The shipped BLIP VQA model of the shapes world: hub layout, offline loading, held-out accuracy per question kind."""

from __future__ import annotations

import torch

from m2ib_lightning.backbones import load_backbone, resolve_model_path
from m2ib_lightning.backbones.loading import SHIPPED_MODELS
from m2ib_lightning.config import CONFIG_DIR, load_config
from m2ib_lightning.shapes.questions import TWO_CHOICE_KINDS, ShapesVQA
from m2ib_lightning.shapes.world import ShapesWorld
from m2ib_lightning.backbones.hf_blip_vqa import first_step_logits

SHIPPED = "builtin:shapes-blip-vqa"
#: measured on 150 held-out questions per kind (images of a world seed used neither in training nor validation)
FLOORS = {"colour": 0.95, "shape": 0.95, "size": 0.93}  # measured 1.000, 0.993, 0.980
# side (0.473) and place (0.487) stay at chance: reported in the README, not asserted


def test_shipped_vqa_model_is_a_hub_layout_directory_under_16_mb():
    path = SHIPPED_MODELS["shapes-blip-vqa"][0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir()) < 16 * 2**20
    assert resolve_model_path(SHIPPED) == str(path)


def test_loads_offline_with_from_pretrained(monkeypatch):
    from transformers import AutoProcessor, BlipForQuestionAnswering, BlipProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(SHIPPED)
    model = BlipForQuestionAnswering.from_pretrained(path)
    assert isinstance(AutoProcessor.from_pretrained(path), BlipProcessor)
    assert model.decoder_start_token_id == BlipProcessor.from_pretrained(path).tokenizer.convert_tokens_to_ids("[DEC]")


@torch.no_grad()
def test_heldout_two_choice_accuracy_per_kind():
    shipped = load_backbone(SHIPPED)
    model, processor = shipped.module, shipped.processor
    world, per_kind, accuracy = ShapesWorld(seed=2), 150, {}
    for kind in TWO_CHOICE_KINDS:
        vqa = ShapesVQA(world, (kind,))
        samples = [vqa.sample(i) for i in range(per_kind)]
        inputs = processor(images=[s.sample.image for s in samples], text=[s.question.text for s in samples],
                           padding=True, return_tensors="pt")
        logits = first_step_logits(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        answers = torch.tensor(processor.tokenizer.convert_tokens_to_ids([s.question.answer for s in samples]))
        accuracy[kind] = (logits.argmax(-1) == answers).float().mean().item()
    print("\nshipped shapes BLIP VQA, held-out accuracy per kind (answer = argmax over the vocabulary): "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    for kind, floor in FLOORS.items():
        assert accuracy[kind] >= floor, (kind, accuracy[kind])


def test_short_vqa_training_run_writes_a_loadable_model(tmp_path):
    from m2ib_lightning.tasks.fit_vqa import run

    cfg = load_config(CONFIG_DIR / "fit_shapes_vqa.yaml", [
        f"output_dir={tmp_path}", "data.train_samples=64", "data.batch_size=16", "data.val_samples=32",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "model.width=32", "model.vision_layers=1",
        "model.text_layers=1", "model.heads=2", "init_vision_from=null", "trainer.enable_progress_bar=false",
    ])
    saved = run(cfg)
    model = load_backbone(str(saved)).module
    assert model.config.text_config.num_hidden_layers == 1
    assert (tmp_path / "fit_summary.json").exists() and list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_the_clip_vision_tower_copies_exactly():
    """Initialising BLIP's vision blocks from the shapes CLIP: every block computes what CLIP's did."""
    from m2ib_lightning.backbones import load_backbone
    from m2ib_lightning.shapes.models.shapes_blip_vqa import build_shapes_blip_vqa, build_vqa_tokenizer, init_vision_from_clip

    clip = load_backbone("builtin:shapes-clip").module
    blip = build_shapes_blip_vqa(build_vqa_tokenizer())
    init_vision_from_clip(blip, clip)
    hidden = torch.randn(2, 65, 128)
    for a, b in zip(clip.vision_model.encoder.layers, blip.vision_model.encoder.layers):
        torch.testing.assert_close(b(hidden), a(hidden, None), atol=1e-5, rtol=1e-5)
