"""Torch datasets over the shapes world: training pairs with their positives, and 8-way retrieval."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..backbones.base import pad_token_ids
from .world import ShapesWorld, WorldSample


class ImageToTensor:
    """The CLIP image processor's arithmetic for images already at the model's size (no resize, no crop)."""

    def __init__(self, image_processor: Any, image_size: int):
        self.mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(3, 1, 1)
        self.image_size = image_size

    def __call__(self, image) -> Tensor:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
        if array.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(f"image is {array.shape[1]}x{array.shape[0]}, expected {self.image_size}x{self.image_size}")
        pixels = torch.from_numpy(array).permute(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std



class WorldPairs(Dataset):
    """Samples ``start .. start + count`` of a world as model inputs (rendered on the fly)."""

    def __init__(self, world: ShapesWorld, start: int, count: int, tokenizer: Any, to_tensor: ImageToTensor):
        self.world, self.start, self.count = world, start, count
        self.tokenizer, self.to_tensor = tokenizer, to_tensor

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> WorldSample:
        return self.world.sample(self.start + index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.sample(index)
        return {
            "pixel_values": self.to_tensor(sample.image),
            "input_ids": self.tokenizer(sample.text)["input_ids"],
            "caption": sample.caption,
            "scene": sample.scene,
        }


def collate_pairs(items: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Batch of pairs plus ``positives`` (B, B): caption j truly describes image i."""
    ids, mask = pad_token_ids([item["input_ids"] for item in items], pad_id)
    positives = torch.tensor([[c["caption"].describes(i["scene"]) for c in items] for i in items], dtype=torch.bool)
    positives |= torch.eye(len(items), dtype=torch.bool)
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": ids,
        "attention_mask": mask,
        "positives": positives,
    }


class WorldRetrieval(Dataset):
    """Each image with ``candidates`` captions: its own first, then captions of other samples that do not describe it."""

    def __init__(self, pairs: WorldPairs, candidates: int = 8, seed: int = 0):
        self.pairs, self.candidates, self.seed = pairs, candidates, seed
        self.captions = [pairs.world.caption_of(pairs.start + i)[0] for i in range(len(pairs))]

    def __len__(self) -> int:
        return len(self.pairs)

    def candidate_texts(self, index: int) -> list[str]:
        scene = self.pairs.world.scene(self.pairs.start + index)
        rng = random.Random(f"{self.seed}:{index}")
        own = self.captions[index].text
        pool = [c.text for c in self.captions if not c.describes(scene) and c.text != own]
        distractors = rng.sample(sorted(set(pool)), self.candidates - 1)
        return [own, *distractors]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.pairs[index]
        return {
            "pixel_values": item["pixel_values"],
            "candidates": [self.pairs.tokenizer(t)["input_ids"] for t in self.candidate_texts(index)],
        }


def collate_retrieval(items: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Images (B, 3, H, W) and candidate captions flattened to (B * K, L); the right one is always first."""
    ids, mask = pad_token_ids([c for item in items for c in item["candidates"]], pad_id)
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": ids,
        "attention_mask": mask,
        "candidates": torch.tensor(len(items[0]["candidates"])),
    }
