"""The shipped small CLIP: loads offline like a hub model, retrieves well, and M2IB on it localises."""

from __future__ import annotations

import pytest
import torch

from m2ib_lightning.config import CONFIG_DIR, load_config
from m2ib_lightning.shapes.world import ShapesWorld
from m2ib_lightning.shapes.datasets import WorldPairs, WorldRetrieval, collate_retrieval, ImageToTensor
from m2ib_lightning.backbones import load_backbone, resolve_model_path
from m2ib_lightning.backbones.loading import SHIPPED_MODELS


def load_clip(name_or_path):
    backbone = load_backbone(name_or_path, "hf_clip")
    return backbone.module, backbone.processor

SHIPPED = "builtin:shapes-clip"


def test_shipped_model_is_a_hub_layout_directory_under_10_mb():
    path = SHIPPED_MODELS["shapes-clip"][0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir()) < 10 * 2**20
    assert resolve_model_path(SHIPPED) == str(path)


def test_shipped_model_loads_through_from_pretrained_offline(monkeypatch):
    from transformers import AutoProcessor, CLIPModel, CLIPProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(SHIPPED)
    model = CLIPModel.from_pretrained(path)
    processor = CLIPProcessor.from_pretrained(path)
    assert isinstance(AutoProcessor.from_pretrained(path), CLIPProcessor)
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id != 2
    inputs = processor(images=ShapesWorld(seed=1).sample(0).image, text=["a red circle"], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)


def test_unknown_builtin_name_is_refused():
    with pytest.raises(ValueError, match="no shipped model 'nope'"):
        resolve_model_path("builtin:nope")


@torch.no_grad()
def test_shipped_model_zero_shot_retrieval_accuracy():
    model, processor = load_clip(SHIPPED)
    pairs = WorldPairs(ShapesWorld(seed=1), 0, 256, processor.tokenizer, ImageToTensor(processor.image_processor, 64))
    retrieval = WorldRetrieval(pairs, candidates=8)
    batch = collate_retrieval([retrieval[i] for i in range(len(retrieval))], pad_id=processor.tokenizer.pad_token_id)
    image = torch.nn.functional.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
    text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    text = torch.nn.functional.normalize(text, dim=-1).view(len(retrieval), 8, -1)
    accuracy = (torch.einsum("bp,bkp->bk", image, text).argmax(1) == 0).float().mean().item()
    print(f"\nshipped shapes CLIP: held-out image-to-caption accuracy among 8 candidates = {accuracy:.3f} (256 images)")
    assert accuracy >= 0.9


def test_short_training_run_writes_a_loadable_model(tmp_path):
    from m2ib_lightning.tasks.fit_clip import run

    cfg = load_config(
        CONFIG_DIR / "fit_shapes_clip.yaml",
        [
            f"output_dir={tmp_path}", "data.train_samples=64", "data.batch_size=16", "data.val_samples=16",
            "data.num_workers=0", "trainer.max_steps=3", "trainer.val_check_interval=3", "model.width=32",
            "model.layers=1", "model.heads=2", "trainer.enable_progress_bar=false",
        ],
    )
    saved = run(cfg)
    model, processor = load_clip(str(saved))
    assert model.config.vision_config.num_hidden_layers == 1
    assert (tmp_path / "fit_summary.json").exists() and list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents*"))


def test_m2ib_on_the_shipped_model_localises_better_than_random(tmp_path):
    from m2ib_lightning.tasks.attribute import run

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.num_samples=64", "data.batch_size=32",
                             "export.overlays=0", "trainer.enable_progress_bar=false",
                             "m2ib.batch_invariant=false"])  # the batch fitted at once: the same maps to ~1e-6, faster
    summary = run(cfg)
    m2ib, random = summary["localisation"]["m2ib"], summary["localisation"]["random"]
    print(f"\nlocalisation over 64 held-out pairs: m2ib {m2ib}, random {random}")
    assert summary["total_in_output"] == 64
    assert m2ib["pointing_game"] >= 0.6
    assert m2ib["pointing_game"] > random["pointing_game"] and m2ib["energy"] > random["energy"]


def test_training_image_conversion_equals_the_saved_processor():
    """Training skips the processor for speed; its arithmetic must be the processor's."""
    _, processor = load_clip(SHIPPED)
    to_tensor = ImageToTensor(processor.image_processor, 64)
    for index in range(4):
        image = ShapesWorld(seed=1).sample(index).image
        expected = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(to_tensor(image), expected, atol=1e-6, rtol=0)


def test_a_fit_saves_and_reports_on_global_rank_0_only(tmp_path, monkeypatch):
    """Under DDP every rank runs the task: only rank 0 may write the model and the summary."""
    from types import SimpleNamespace

    from m2ib_lightning.tasks import common

    saved = []

    class Trainer:  # what fit_and_save uses of a Trainer on a rank other than 0
        global_rank, global_step = 1, 3

        def fit(self, *args): pass

        def validate(self, *args, **kwargs): return [{"val/acc": 1.0}]

    monkeypatch.setattr(common, "make_trainer", lambda cfg, **kwargs: Trainer())
    model = SimpleNamespace(save_pretrained=lambda path: saved.append(("model", path)))
    processor = SimpleNamespace(save_pretrained=lambda path: saved.append(("processor", path)),
                                image_processor=SimpleNamespace(save_pretrained=lambda path: saved.append(("image", path))))
    cfg = load_config(CONFIG_DIR / "fit_shapes_clip.yaml", [f"output_dir={tmp_path}"])
    assert common.fit_and_save(cfg, tmp_path, SimpleNamespace(model=model), None, None, processor) is None
    assert saved == []
    Trainer.global_rank = 0
    assert common.fit_and_save(cfg, tmp_path, SimpleNamespace(model=model), None, None, processor)[1] == 3
    assert [kind for kind, _ in saved] == ["model", "processor", "image"]
