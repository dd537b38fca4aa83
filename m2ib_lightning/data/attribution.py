"""Image-text pairs to attribute, turned into model inputs by the backbone adapter.

A sample's noise seed derives from the run seed and the sample id alone, so
its maps do not depend on order, batch size, worker count or device count.
The adapter owns preprocessing (``image_inputs``, ``text_inputs``,
``pad_token_id``); nothing here knows a model family.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any, Sequence

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .records import BadImage, Failure, PairRecord
from .world import ShapesWorld
from .world_dataset import pad_token_ids


def sample_seed(run_seed: int, sample_id: str) -> int:
    """A 63-bit seed from (run seed, sample id): stable across machines and Python versions."""
    digest = hashlib.sha256(f"{run_seed}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def world_records(world: ShapesWorld, count: int) -> list[PairRecord]:
    """The first ``count`` samples of a (held-out) world as records."""
    return [
        PairRecord(world.sample_id(i), world.caption_of(i)[0].text, partial(_world_image, world, i)) for i in range(count)
    ]


def _world_image(world: ShapesWorld, index: int) -> Image.Image:
    return world.sample(index).image


def world_index(sample_id: str) -> int:
    """Index of a world sample from its id (``shapes-SEED-INDEX``)."""
    return int(sample_id.rsplit("-", 1)[1])


class PairDataset(Dataset):
    """Records minus those already done, as model inputs made by the backbone adapter."""

    def __init__(self, records: Sequence[PairRecord], backbone: Any, run_seed: int, skip_ids: set[str] = frozenset()):
        self.records = [r for r in records if r.id not in skip_ids]
        self.backbone, self.run_seed = backbone, run_seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """A model-ready sample, or ``{"id", "failure"}`` for a record that cannot be attributed."""
        record = self.records[index]
        try:
            pixels = self.backbone.image_inputs(record.load_image())
        except BadImage as err:
            return {"id": record.id, "failure": Failure(record.id, str(err))}
        text = self.backbone.text_inputs(record.text)
        item = {
            "id": record.id,
            "text": record.text,
            "pixel_values": pixels,
            "input_ids": text.ids,
            "tokens": self.backbone.token_strings(text.ids),
            "special": self.backbone.special_mask(text.ids),
            "seed": sample_seed(self.run_seed, record.id),
        }
        if text.truncated:
            reason = f"caption truncated from {text.full_length} to {len(text.ids)} tokens (the model's limit)"
            item["warning"] = Failure(record.id, reason, "warning")
        return item


def collate_attribution(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Batch the good samples; failed ones (and warnings) travel along in ``failures``."""
    reports = [item.get("failure") or item.get("warning") for item in items]
    failures = [report.to_json() for report in reports if report is not None]
    items = [item for item in items if "failure" not in item]
    if not items:
        return {"id": [], "failures": failures}
    ids, mask = pad_token_ids([item["input_ids"] for item in items], pad_id)
    return {
        "failures": failures,
        "id": [item["id"] for item in items],
        "text": [item["text"] for item in items],
        "tokens": [item["tokens"] for item in items],
        "special": [item["special"] for item in items],
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": ids,
        "attention_mask": mask,
        "seed": torch.tensor([item["seed"] for item in items], dtype=torch.long),
    }


class PairDataModule(L.LightningDataModule):
    """Predict-only data module over a list of records."""

    def __init__(
        self,
        records: Sequence[PairRecord],
        backbone: Any,
        *,
        run_seed: int,
        batch_size: int = 8,
        num_workers: int = 0,
        skip_ids: set[str] = frozenset(),
    ):
        super().__init__()
        self.dataset = PairDataset(records, backbone, run_seed, skip_ids)
        self.pad_id = backbone.pad_token_id
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=partial(collate_attribution, pad_id=self.pad_id),
        )
