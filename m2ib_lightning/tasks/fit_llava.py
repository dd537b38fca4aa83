"""Train the small LLaVA of the shapes world with Lightning ``fit`` and save it in the hub layout.

The loss is the answers' (one word, then ``</s>``) cross-entropy under teacher forcing,
the prompt's positions masked out, as LLaVA's instruction tuning does. A training sample
is a conversation about one image (``data.turns`` questions, each answered before the
next is asked, as LLaVA's instruction data holds several turns): the language model reads
the image's tokens once for several answers. Held-out questions are asked one per prompt,
as the model is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

from ..shapes.questions import QUESTION_KINDS, ShapesVQA
from ..shapes.datasets import ImageToTensor
from ..shapes.models.shapes_llava import (
    IMAGE, VISION_TOWER, build_llava_processor, build_llava_tokenizer, build_shapes_llava, init_vision_from_clip, prompt_text,
    set_vision_trainable,
)
from .schema import FitOptim, FitVQAData, WorldConfig
from .common import prepare_output, world_of
from ..modules import LlavaTraining
from .fit_vqa import fit_on_questions

IGNORE = -100  # the label of a position the loss skips (transformers' convention)

# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class FitLlavaData(FitVQAData):
    turns: int = 1  # questions about one image in a training sample, each answered before the next


@dataclass
class FitLlavaModel:
    width: int = 128  # the Llama's hidden size
    layers: int = 4
    heads: int = 4
    vision_feature_layer: int = -2  # the vision block whose output the language model reads (LLaVA-1.5: -2)
    freeze_vision: bool = False  # keep the vision tower as vision_from has it (LLaVA-1.5 does); trains 1.4x faster
    vision_lr_scale: float = 1.0  # the vision tower's learning rate relative to optim.lr, when it trains
    position_loss: float = 0.0  # weight of a training-only loss: each image token tells its patch's row and column
    position_axes: List[str] = field(default_factory=lambda: ["row", "col"])  # what it tells: row, col or both
    position_loss_steps: int = 0  # > 0: the position loss in the first that many steps only; 0: throughout


@dataclass
class FitLlavaConfig:
    task: str = "fit_llava"
    seed: int = 0
    output_dir: str = "runs/fit_shapes_llava"
    save_to: Optional[str] = None  # where save_pretrained writes the model; default OUTPUT_DIR/model
    vision_from: str = "builtin:shapes-clip"  # the CLIP whose vision tower becomes the LLaVA's
    # a LLaVA saved by an earlier fit_llava (directory or builtin: name) to go on training, with its tokenizer and
    # processor; vision_from and the architecture keys of model (width, layers, heads, vision_feature_layer) are then its
    init_from: Optional[str] = None
    world: WorldConfig = field(default_factory=WorldConfig)
    data: FitLlavaData = field(default_factory=FitLlavaData)
    model: FitLlavaModel = field(default_factory=FitLlavaModel)
    optim: FitOptim = field(default_factory=FitOptim)
    trainer: Dict[str, Any] = field(default_factory=dict)


#: this module's tasks and their schemas
SCHEMAS = {"fit_llava": FitLlavaConfig}


class LlavaQuestions(Dataset):
    """Samples ``0 .. count`` of a :class:`ShapesVQA` as LLaVA inputs: the chat prompt with ``<image>`` expanded to
    ``image_tokens`` ids, then the answer word and ``</s>``, labels only on the answer; with ``turns`` > 1, a
    conversation: each further question as ``user: QUESTION assistant:`` after the last answer, answered in turn.
    ``answer``, ``wrong`` and ``kind`` are the first question's."""

    def __init__(self, vqa: ShapesVQA, count: int, tokenizer: Any, to_tensor: ImageToTensor, image_tokens: int,
                 turns: int = 1):
        self.vqa, self.count, self.tokenizer, self.to_tensor = vqa, count, tokenizer, to_tensor
        self.image_tokens, self.turns = image_tokens, turns
        self.kind_ids = {kind: i for i, kind in enumerate(QUESTION_KINDS)}
        self.eos = tokenizer.eos_token_id

    def __len__(self) -> int:
        return self.count

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.turns == 1:
            item = self.vqa.sample(index)
            image, questions = item.sample.image, [item.question]
        else:
            scene_index, questions = self.vqa.conversation(index, self.turns)
            image = self.vqa.world.sample(scene_index).image
        ids, labels = [], []
        for turn, q in enumerate(questions):
            text = prompt_text(q.text).replace(IMAGE, IMAGE * self.image_tokens) if turn == 0 else f"user: {q.text} assistant:"
            prompt, (answer,) = self._ids(text), self._ids(q.answer)
            ids += [*prompt, answer, self.eos]
            labels += [IGNORE] * len(prompt) + [answer, self.eos]
        first = questions[0]
        wrong = self._ids(first.wrong)[0] if first.wrong else -1
        return {"pixel_values": self.to_tensor(image), "ids": ids, "labels": labels, "answer": self._ids(first.answer)[0],
                "wrong": wrong, "kind": self.kind_ids[first.kind]}


def collate_llava(items: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded sequences and their labels (the answers and their ``</s>``, IGNORE elsewhere); a one-question
    sample ends with its answer and ``</s>``."""
    width = max(len(item["ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        length = len(item["ids"])
        ids[row, width - length:] = torch.tensor(item["ids"])
        labels[row, width - length:] = torch.tensor(item["labels"])
        mask[row, width - length:] = 1
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "position_ids": (mask.cumsum(1) - 1).clamp_min(0),
        "answer": torch.tensor([item["answer"] for item in items]),
        "wrong": torch.tensor([item["wrong"] for item in items]),
        "kind": torch.tensor([item["kind"] for item in items]),
    }


def _continued(init_from: str) -> tuple[Any, Any]:
    """The LLaVA and processor an earlier fit saved."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..backbones import resolve_model_path

    path = resolve_model_path(init_from)
    return LlavaForConditionalGeneration.from_pretrained(path).train(), AutoProcessor.from_pretrained(path)


def run(cfg: DictConfig) -> Path | None:
    """Fit, validate on held-out questions, and ``save_pretrained`` model and processor (tokenizer, chat template)."""
    from ..backbones import load_backbone

    L.seed_everything(cfg.seed, workers=True)
    out = prepare_output(cfg)
    settings = dict(cfg.model)
    freeze_vision, vision_lr_scale = settings.pop("freeze_vision"), settings.pop("vision_lr_scale")
    position = dict(position_loss=settings.pop("position_loss"), position_axes=tuple(settings.pop("position_axes")),
                    position_loss_steps=settings.pop("position_loss_steps"))
    if cfg.init_from:
        model, processor = _continued(cfg.init_from)
        source = f"init_from={cfg.init_from!r}"
    else:
        clip = load_backbone(cfg.vision_from, "hf_clip").module
        vision = clip.config.vision_config.to_dict()
        processor = build_llava_processor(build_llava_tokenizer(), cfg.world.image_size, vision["patch_size"])
        model = build_shapes_llava(processor.tokenizer, vision, seed=cfg.seed, **settings)
        init_vision_from_clip(model, clip)
        source = f"vision_from={cfg.vision_from!r}"
    seen = model.config.vision_config.image_size
    if seen != cfg.world.image_size:
        raise ValueError(f"{source} sees {seen} px images, the world has {cfg.world.image_size}")
    tokenizer = processor.tokenizer
    set_vision_trainable(model, not freeze_vision)
    image_tokens = model.config.image_seq_length
    to_tensor = ImageToTensor(processor.image_processor, cfg.world.image_size)

    train = LlavaQuestions(ShapesVQA(world_of(cfg, cfg.world.seed), tuple(cfg.data.kinds)), cfg.data.train_samples,
                           tokenizer, to_tensor, image_tokens, turns=cfg.data.turns)
    heldout = LlavaQuestions(ShapesVQA(world_of(cfg, cfg.world.heldout_seed)), cfg.data.val_samples, tokenizer, to_tensor,
                             image_tokens)
    collate = partial(collate_llava, pad_id=tokenizer.pad_token_id)
    module = LlavaTraining(model, **cfg.optim, lr_scales={VISION_TOWER: vision_lr_scale}, **position)
    return fit_on_questions(cfg, out, module, train, heldout, collate, processor)
