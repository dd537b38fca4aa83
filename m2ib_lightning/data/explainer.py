"""An exact attribution run as an explainer's training data, streamed: the run's own source of pairs or questions
(rebuilt from its config) gives the model inputs, its shards the target capacities, found by id through an on-disk
lookup (SQLite) with a few shards in memory, its index the answer explained; a held-out split by a hash of the id."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import lightning as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from .attribution import PairSource, PairStream, QuestionStream, SizedBatches, collate_attribution, collate_questions
from .records import Failure
from ..results import SHARD_DIR, atomic_write, index_entries

#: shards kept in memory per loader worker: a run of R ranks interleaves R shards in its source's order
OPEN_SHARDS = 4


def held_out(sample_id: str, fraction: float) -> bool:
    """Whether a sample is in the held-out split: a hash of its id, so any topology and order agree."""
    digest = hashlib.sha256(f"explainer-split\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


class ExactMaps(NamedTuple):
    """What an exact run wrote for one id: image token capacities (CLS first, as the fit's), text capacities
    (aligned with the prompt's ids) and, in a run of questions, the answer explained (None in a run of pairs)."""

    image: torch.Tensor
    text: torch.Tensor
    answer: str | None


class ExactTargets:
    """The capacities an exact run wrote for each id: ``lookup(id)`` gives its :class:`ExactMaps`, or None for an
    id the run does not hold."""

    def __init__(self, run_dir: str | Path, table: str | Path):
        self.run_dir, self.table = Path(run_dir), Path(table)
        self._connection: sqlite3.Connection | None = None
        self._connected_in: int | None = None
        self._shards: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    @classmethod
    def build(cls, run_dir: str | Path, table: str | Path) -> "ExactTargets":
        """Write the id -> (shard, row) table of a run's index, streamed, into ``table`` (whole or not at all)."""
        table = Path(table)

        def write(tmp: Path) -> None:
            tmp.unlink(missing_ok=True)
            with sqlite3.connect(tmp) as db:
                db.execute("CREATE TABLE targets (id TEXT PRIMARY KEY, shard TEXT, row INTEGER, length INTEGER, answer TEXT)")
                rows = ((e["id"], e["shard"], e["row"], e["length"], e.get("answer")) for e in index_entries(run_dir))
                db.executemany("INSERT OR REPLACE INTO targets VALUES (?, ?, ?, ?, ?)", rows)
            db.close()

        atomic_write(table, write)
        return cls(run_dir, table)

    def __len__(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM targets").fetchone()[0]

    def _db(self) -> sqlite3.Connection:
        if self._connection is None or self._connected_in != os.getpid():  # a connection does not cross a fork
            self._connection = sqlite3.connect(f"file:{self.table}?mode=ro", uri=True)
            self._connected_in = os.getpid()
        return self._connection

    def lookup(self, sample_id: str) -> ExactMaps | None:
        found = self._db().execute("SELECT shard, row, length, answer FROM targets WHERE id = ?", (sample_id,)).fetchone()
        if found is None:
            return None
        shard, row, length, answer = found
        if shard not in self._shards:
            self._shards[shard] = load_file(self.run_dir / SHARD_DIR / shard)
            while len(self._shards) > OPEN_SHARDS:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard)
        tensors = self._shards[shard]
        return ExactMaps(tensors["image_token_capacity"][row].clone(), tensors["text_capacity"][row, :length].clone(), answer)

    def __getstate__(self) -> dict[str, Any]:  # to loader workers: without the connection and the open shards
        return {**self.__dict__, "_connection": None, "_connected_in": None, "_shards": OrderedDict()}


class ExplainerExamples(PairStream):
    """The pairs of an exact run's source that it attributed, as model inputs with their exact capacities
    (``target_image`` (T,), ``target_text`` (L,)), in the train or the held-out split; shuffled within a
    window of ``shuffle_buffer`` examples (a new order each pass) where ``shuffle_buffer`` > 1."""

    def __init__(self, source: PairSource, backbone: Any, targets: ExactTargets, *, held_out_fraction: float,
                 split: str, shuffle_buffer: int = 1, seed: int = 0):
        super().__init__(source, backbone, run_seed=seed)
        self.targets, self.held_out_fraction, self.split = targets, held_out_fraction, split
        self.shuffle_buffer, self.seed, self.passes = shuffle_buffer, seed, 0

    def _examples(self) -> Iterator[dict[str, Any]]:
        for record in self.records():
            if isinstance(record, Failure) or held_out(record.id, self.held_out_fraction) != (self.split == "val"):
                continue
            found = self.targets.lookup(record.id)  # before the record is loaded: most of a source may not be in the run
            if found is None:
                continue
            item = self.item(record)
            if "failure" in item or len(found.text) != len(item["input_ids"]):  # tokenised otherwise than in the exact run
                continue
            if found.answer is not None:  # the answer the exact run explained (given, or the model's own)
                try:
                    item["answer_ids"] = self.backbone.answer_inputs(found.answer)
                except ValueError:
                    continue
            yield {**item, "target_image": found.image, "target_text": found.text}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.passes += 1
        if self.shuffle_buffer <= 1:
            yield from self._examples()
            return
        rng, window = random.Random(f"{self.seed}-{self.passes}-{self.rank}"), []
        for example in self._examples():
            window.append(example)
            if len(window) >= self.shuffle_buffer:
                yield window.pop(rng.randrange(len(window)))
        rng.shuffle(window)
        yield from window


class AnswerExplainerExamples(ExplainerExamples, QuestionStream):
    """:class:`ExplainerExamples` of an exact run of questions: the questions as the answer adapter's inputs, each
    with the answer the run explained."""


def collate_examples(items: list[dict[str, Any]], pad_id: int, backbone: Any = None) -> dict[str, Any]:
    """An attribution batch (of questions, given the answer ``backbone``) plus the targets: image (B, T) and text
    (B, L) capacities, zero at padding."""
    batch = collate_attribution(items, pad_id) if backbone is None else collate_questions(items, pad_id, backbone)
    if items:
        image = torch.zeros(len(items), max(len(item["target_image"]) for item in items))  # pictures of several sizes
        text = torch.zeros(batch["input_ids"].shape)
        for row, item in enumerate(items):
            image[row, : len(item["target_image"])] = item["target_image"]
            text[row, : len(item["target_text"])] = item["target_text"]
        batch["target_image"], batch["target_text"] = image, text
    return batch


class ExplainerDataModule(L.LightningDataModule):
    """Train and held-out examples of an exact run (of questions, with ``questions``); the lookup table is built by
    rank 0 at ``prepare_data``."""

    def __init__(self, run_dir: str | Path, source: PairSource, backbone: Any, table: str | Path, *, batch_size: int,
                 held_out_fraction: float = 0.05, shuffle_buffer: int = 2048, num_workers: int = 0, seed: int = 0,
                 questions: bool = False):
        super().__init__()
        self.questions = questions
        self.run_dir, self.source, self.backbone, self.table = Path(run_dir), source, backbone, Path(table)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.held_out_fraction, self.shuffle_buffer = held_out_fraction, shuffle_buffer
        self.collate = partial(collate_examples, pad_id=backbone.pad_token_id, backbone=backbone if questions else None)

    def prepare_data(self) -> None:
        ExactTargets.build(self.run_dir, self.table)  # anew each fit: the exact run may have grown since

    def _loader(self, split: str) -> DataLoader:
        stream = AnswerExplainerExamples if self.questions else ExplainerExamples
        examples = stream(self.source, self.backbone, ExactTargets(self.run_dir, self.table),
                          held_out_fraction=self.held_out_fraction, split=split,
                          shuffle_buffer=self.shuffle_buffer if split == "train" else 1, seed=self.seed)
        if self.trainer is not None:
            examples.rank, examples.world_size = self.trainer.global_rank, self.trainer.world_size
        # persistent: a worker keeps its copy of the stream, whose pass count gives each epoch its own order;
        # questions go in batches of one picture size (Qwen2-VL keeps each picture's own), batched in the worker
        batched = {"dataset": SizedBatches(examples, self.batch_size), "batch_size": None} if self.questions else {
            "dataset": examples, "batch_size": self.batch_size}
        return DataLoader(**batched, num_workers=self.num_workers, collate_fn=self.collate,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")
