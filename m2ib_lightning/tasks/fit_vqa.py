"""Train the small BLIP VQA model of the shapes world with Lightning ``fit`` and save it in the hub layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..modules import AnswerFit, VQATraining
from ..shapes.questions import QUESTION_KINDS, ShapesVQA
from ..backbones.base import pad_token_ids
from ..shapes.datasets import ImageToTensor
from ..shapes.models.shapes_blip_vqa import (
    build_shapes_blip_vqa,
    build_vqa_image_processor,
    build_vqa_tokenizer,
    init_vision_from_clip,
)
from .schema import FitOptim, FitVQAData, WorldConfig
from .common import fit_and_save, prepare_output, world_of, write_fit_summary

# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class FitVQAModel:
    patch_size: int = 8
    width: int = 128
    vision_layers: int = 4
    text_layers: int = 4
    heads: int = 4


@dataclass
class FitVQAConfig:
    task: str = "fit_vqa"
    seed: int = 0
    output_dir: str = "runs/fit_shapes_vqa"
    save_to: Optional[str] = None  # where save_pretrained writes the model; default OUTPUT_DIR/model
    init_vision_from: Optional[str] = "builtin:shapes-clip"  # a CLIP whose vision tower starts the BLIP one
    world: WorldConfig = field(default_factory=WorldConfig)
    data: FitVQAData = field(default_factory=FitVQAData)
    model: FitVQAModel = field(default_factory=FitVQAModel)
    optim: FitOptim = field(default_factory=FitOptim)
    trainer: Dict[str, Any] = field(default_factory=dict)


#: this module's tasks and their schemas
SCHEMAS = {"fit_vqa": FitVQAConfig}


class VQAQuestions(Dataset):
    """Samples ``0 .. count`` of a :class:`ShapesVQA` as model inputs; labels are ``[DEC] answer [SEP]``."""

    def __init__(self, vqa: ShapesVQA, count: int, tokenizer: Any, to_tensor: ImageToTensor):
        self.vqa, self.count, self.tokenizer, self.to_tensor = vqa, count, tokenizer, to_tensor
        self.kind_ids = {kind: i for i, kind in enumerate(QUESTION_KINDS)}

    def __len__(self) -> int:
        return self.count

    def _answer_id(self, word: str) -> int:
        (token,) = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        return token

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.vqa.sample(index)
        q = item.question
        answer = self._answer_id(q.answer)
        return {
            "pixel_values": self.to_tensor(item.sample.image),
            "input_ids": self.tokenizer(q.text)["input_ids"],
            "labels": [self.tokenizer.bos_token_id, answer, self.tokenizer.sep_token_id],
            "answer": answer,
            "wrong": self._answer_id(q.wrong) if q.wrong else -1,
            "kind": self.kind_ids[q.kind],
        }


def collate_questions(items: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    ids, mask = pad_token_ids([item["input_ids"] for item in items], pad_id)
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([item["labels"] for item in items]),
        "answer": torch.tensor([item["answer"] for item in items]),
        "wrong": torch.tensor([item["wrong"] for item in items]),
        "kind": torch.tensor([item["kind"] for item in items]),
    }


def accuracy_per_kind(metrics: dict) -> dict[str, float]:
    """The last validation's ``val/acc_KIND`` metrics as {kind: accuracy}."""
    return {k.removeprefix("val/acc_"): round(float(v), 4) for k, v in metrics.items()}


def run(cfg: DictConfig) -> Path | None:
    """Fit, validate on held-out questions, and ``save_pretrained`` model, tokenizer and processor."""
    from transformers import BlipProcessor

    from ..backbones import load_backbone

    L.seed_everything(cfg.seed, workers=True)
    out = prepare_output(cfg)
    tokenizer = build_vqa_tokenizer()
    image_processor = build_vqa_image_processor(cfg.world.image_size)
    to_tensor = ImageToTensor(image_processor, cfg.world.image_size)
    model = build_shapes_blip_vqa(tokenizer, image_size=cfg.world.image_size, seed=cfg.seed, **cfg.model)
    if cfg.init_vision_from:
        init_vision_from_clip(model, load_backbone(cfg.init_vision_from, "hf_clip").module)

    train = VQAQuestions(ShapesVQA(world_of(cfg, cfg.world.seed), tuple(cfg.data.kinds)), cfg.data.train_samples, tokenizer, to_tensor)
    heldout = VQAQuestions(ShapesVQA(world_of(cfg, cfg.world.heldout_seed)), cfg.data.val_samples, tokenizer, to_tensor)
    collate = partial(collate_questions, pad_id=tokenizer.pad_token_id)
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return fit_on_questions(cfg, out, VQATraining(model, **cfg.optim), train, heldout, collate, processor)


def fit_on_questions(cfg: DictConfig, out: Path, module: AnswerFit, train: Dataset, heldout: Dataset, collate: Any,
                     processor: Any) -> Path | None:
    """Fit on the training questions, validate on the held-out ones, save and report (rank 0): every VQA fit."""
    train_loader = DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                              num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    val_loader = DataLoader(heldout, batch_size=128, collate_fn=collate)
    fitted = fit_and_save(cfg, out, module, train_loader, val_loader, processor)
    if fitted is None:  # not global rank 0, which alone saves and reports
        return None
    save_to, steps, metrics, wall = fitted
    summary = write_fit_summary(cfg, out, fitted, {"heldout_accuracy": accuracy_per_kind(metrics)})
    print(f"saved the model to {save_to} after {steps} steps, {wall / 60:.1f} min; "
          f"held-out accuracy per kind: {summary['heldout_accuracy']}")
    return save_to
