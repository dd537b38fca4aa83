"""Image-text pairs to attribute, streamed from a source and turned into model inputs by the backbone adapter.

A source (the shapes world, a manifest, WebDataset shards) yields records and
failure reports in a fixed order and hands each rank and loader worker its own
share (``split(slot, slots, skip)``), minus the ids already done. Nothing holds
the whole dataset: a run of a million pairs keeps only the batches being filled
(one per picture size, at most 8).

A sample's noise seed derives from the run seed and the sample id alone, so
its maps do not depend on order, batch size, worker count or device count.
The adapter owns preprocessing (``image_inputs``, ``text_inputs``,
``pad_token_id``, and ``image_geometry`` where it has one); nothing here knows
a model family.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import cached_property, partial
from typing import Any, Callable, Iterable, Iterator, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..backbones.capabilities import require
from .records import BadImage, Failure, PairRecord
from ..shapes.world import ShapesWorld
from ..backbones.base import pad_token_ids


def sample_seed(run_seed: int, sample_id: str) -> int:
    """A 63-bit seed from (run seed, sample id): stable across machines and Python versions."""
    digest = hashlib.sha256(f"{run_seed}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PairSource(Protocol):
    """Where pairs come from; see :class:`~m2ib_lightning.data.manifest.ManifestSource` for the contract."""

    def split(self, slot: int, slots: int, skip: set[str] | frozenset = frozenset()) -> Iterator[PairRecord | Failure]: ...

    def size_hint(self) -> int | None: ...


class WorldSource:
    """The first ``count`` samples of a (held-out) shapes world, with the caption's objects as ground truth and the
    shape of the first object it names as the sample's class."""

    def __init__(self, world: ShapesWorld, count: int):
        self.world, self.count = world, count

    def size_hint(self) -> int:
        return self.count

    def split(self, slot: int, slots: int, skip: set[str] | frozenset = frozenset()) -> Iterator[PairRecord]:
        for index in range(slot, self.count, slots):
            sample_id = self.world.sample_id(index)
            if sample_id in skip:  # before anything is drawn
                continue
            drawn = _WorldDrawing(self.world, index)
            caption, referred = self.world.caption_of(index)
            yield PairRecord(sample_id, caption.text, drawn.image, load_mask=drawn.mask,
                             target_class=self.world.scene(index).objects[referred[0]].shape)


class QuestionWorldSource:
    """The first ``count`` questions of a (held-out) shapes world: each names one object, whose mask is the ground
    truth and whose shape the class; the world's answer is the one explained unless ``own_answers``."""

    def __init__(self, vqa: Any, count: int, own_answers: bool = False):
        self.vqa, self.count, self.own_answers = vqa, count, own_answers

    def size_hint(self) -> int:
        return self.count

    def split(self, slot: int, slots: int, skip: set[str] | frozenset = frozenset()) -> Iterator[PairRecord]:
        for index in range(slot, self.count, slots):
            sample_id = f"vqa-{self.vqa.world.seed}-{index}"
            if sample_id in skip:
                continue
            scene_index, question = self.vqa.question(index)
            drawn = _WorldDrawing(self.vqa.world, scene_index)
            target = question.target
            yield PairRecord(sample_id, question.text, drawn.image, load_mask=lambda d=drawn, t=target: d.sample.object_masks[t],
                             target_class=self.vqa.world.scene(scene_index).objects[target].shape,
                             answer=None if self.own_answers else question.answer)


class _WorldDrawing:
    """One world sample, drawn once (in the loader worker) for both its image and its ground truth."""

    def __init__(self, world: ShapesWorld, index: int):
        self.world, self.index = world, index

    @cached_property
    def sample(self):
        return self.world.sample(self.index)

    def image(self):
        return self.sample.image

    def mask(self):
        return self.sample.target_mask


class PairStream(IterableDataset):
    """A source's records minus those already done, as model inputs made by the backbone adapter.

    Each (rank, loader worker) reads its own share of the source; ``rank`` and
    ``world_size`` are set by :class:`PairDataModule` once the trainer knows them.
    It has no ``len()`` on purpose: Lightning would stop a rank after that many
    batches, and the share of a rank is only known once it is read.
    """

    def __init__(self, source: PairSource, backbone: Any, run_seed: int, skip_ids: set[str] | frozenset = frozenset()):
        self.source, self.backbone, self.run_seed, self.skip_ids = source, backbone, run_seed, skip_ids
        self.rank, self.world_size = 0, 1

    def records(self) -> Iterator[PairRecord | Failure]:
        """This (rank, loader worker)'s share of the source, minus the ids already done."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.source.split(self.rank * workers + worker, self.world_size * workers, self.skip_ids)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for entry in self.records():
            if isinstance(entry, Failure):
                yield {"id": entry.id, "failure": entry}
            else:
                yield self.item(entry)

    def item(self, record: PairRecord) -> dict[str, Any]:
        """A model-ready sample, or ``{"id", "failure"}`` for a record that cannot be attributed."""
        try:
            image = record.load_image()
        except BadImage as err:
            return {"id": record.id, "failure": Failure(record.id, str(err))}
        pixels = self.backbone.image_inputs(image)
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
        failure = self.add_ground_truth(item, record, image, tuple(pixels.shape[-2:]))
        if failure is not None:
            return {"id": record.id, "failure": failure}
        warnings = []
        if text.truncated:
            warnings.append(f"caption truncated from {text.full_length} to {len(text.ids)} tokens (the model's limit)")
        unknown = getattr(self.backbone, "unknown_token_id", None)  # optional: adapters with a tokenizer have it
        words = [i for i, special in zip(text.ids, item["special"]) if not special or i == unknown]  # unk counts as special
        if unknown is not None and words and all(i == unknown for i in words):
            warnings.append("the caption tokenizes to unknown tokens only (none of its words is in the tokenizer's "
                            "vocabulary): its text map says nothing about its words")
        if warnings:
            item["warning"] = Failure(record.id, "; ".join(warnings), "warning")
        return item

    def add_ground_truth(self, item: dict[str, Any], record: PairRecord, image: Any, size: tuple[int, int]) -> Failure | None:
        """The record's mask in the model input's (``size``) coordinates, its class and the image geometry, into
        ``item``; a :class:`Failure` for ground truth that cannot be used."""
        geometry = self.backbone.image_geometry(image) if hasattr(self.backbone, "image_geometry") else None
        if geometry is not None:
            item["geometry"] = dataclasses.asdict(geometry)
        if record.load_mask is None:
            return None
        try:
            mask = torch.as_tensor(record.load_mask(), dtype=torch.bool)
            if tuple(mask.shape) != size:  # given on the original image
                if geometry is None:
                    raise ValueError(f"mask is {tuple(mask.shape)}, the model input {size}")
                mask = geometry.to_model(mask)
        except (BadImage, ValueError) as err:
            return Failure(record.id, f"ground truth: {err}")
        if not mask.any():
            return Failure(record.id, "ground truth: the mask is empty inside the model's crop")
        item["target_mask"] = mask
        item["target_class"] = record.target_class
        return None


class QuestionStream(PairStream):
    """A source's questions minus those already done, as model inputs made by an answer adapter (``questions``)."""

    def item(self, record: PairRecord) -> dict[str, Any]:
        try:
            image = record.load_image()
        except BadImage as err:
            return {"id": record.id, "failure": Failure(record.id, str(err))}
        question = self.backbone.question_inputs(image, record.text)
        picture = self.backbone.sample_image(self.backbone.join_inputs([question.image]), 0)  # (C, H, W) as seen
        item = {
            "id": record.id,
            "text": record.text,
            "image_inputs": question.image,
            "picture": picture,
            "input_ids": question.ids,
            "tokens": self.backbone.token_strings(question.ids),
            "special": [not shown for shown in question.visible],  # displays show the question's own words
            "seed": sample_seed(self.run_seed, record.id),
        }
        if record.answer is not None:
            try:
                item["answer_ids"] = self.backbone.answer_inputs(record.answer)
            except ValueError as err:
                return {"id": record.id, "failure": Failure(record.id, str(err))}
        failure = self.add_ground_truth(item, record, image, tuple(picture.shape[-2:]))
        return item if failure is None else {"id": record.id, "failure": failure}


def _batch_of(items: list[dict[str, Any]], pad_id: int) -> tuple[list[dict], dict[str, Any]]:
    """What pair and question batches share: failure reports, the good items, their ids, tokens, prompts,
    seeds and ground truth."""
    reports = [item.get("failure") or item.get("warning") for item in items]
    failures = [report.to_json() for report in reports if report is not None]
    items = [item for item in items if "failure" not in item]
    if not items:
        return items, {"id": [], "failures": failures}
    ids, mask = pad_token_ids([item["input_ids"] for item in items], pad_id)
    batch = {
        "failures": failures,
        "id": [item["id"] for item in items],
        "text": [item["text"] for item in items],
        "tokens": [item["tokens"] for item in items],
        "special": [item["special"] for item in items],
        "geometry": [item.get("geometry") for item in items],
        "input_ids": ids,
        "attention_mask": mask,
        "seed": torch.tensor([item["seed"] for item in items], dtype=torch.long),
    }
    if any("target_mask" in item for item in items):  # ground truth where the data has it; has_target says where
        size = next(item["target_mask"].shape for item in items if "target_mask" in item)
        empty = torch.zeros(size, dtype=torch.bool)
        fits = [item.get("target_mask", empty).shape == size for item in items]  # pictures of another size: none
        batch["target_mask"] = torch.stack([item.get("target_mask", empty) if fit else empty for item, fit in zip(items, fits)])
        batch["has_target"] = torch.tensor(["target_mask" in item and fit for item, fit in zip(items, fits)])
        batch["target_class"] = [item.get("target_class") for item in items]
    return items, batch


def collate_attribution(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Batch the good samples; failed ones (and warnings) travel along in ``failures``."""
    items, batch = _batch_of(items, pad_id)
    if items:
        batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
    return batch


def collate_questions(items: list[dict[str, Any]], pad_id: int, backbone: Any) -> dict[str, Any]:
    """Batch the good questions: image inputs joined by the adapter, answers where given (``answer_given``)."""
    items, batch = _batch_of(items, pad_id)
    if not items:
        return batch
    batch["image_items"] = [item["image_inputs"] for item in items]  # each sample's, for joining any subset of them
    batch["pictures"] = [item["picture"] for item in items]  # (C, H, W) as the model sees each
    batch["pixel_values"] = backbone.join_inputs(batch["image_items"])["pixel_values"]
    answers, answer_mask = pad_token_ids([item.get("answer_ids", [pad_id]) for item in items], pad_id)
    batch["answer_ids"], batch["answer_mask"] = answers, answer_mask
    batch["answer_given"] = torch.tensor(["answer_ids" in item for item in items])
    return batch


def same_size_batches(items: Iterable[dict[str, Any]], batch_size: int, max_open: int = 8) -> Iterator[list[dict[str, Any]]]:
    """Items in lists of ``batch_size`` whose pictures (``picture``, else ``pixel_values``) have one size, in stream
    order within each size: a batch holds one map size (Qwen2-VL keeps each picture's own). Failed items ride with
    the next batch out. At most ``max_open`` sizes are held part-filled: a new one past that sends the oldest out
    short, so memory stays at ``max_open`` batches whatever the data."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    open_batches: dict[tuple[int, ...], list[dict[str, Any]]] = {}  # insertion order: the oldest first
    failed: list[dict[str, Any]] = []

    def out(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal failed
        batch, failed = [*failed, *batch], []
        return batch

    for item in items:
        if "failure" in item:
            failed.append(item)
            continue
        size = tuple((item["picture"] if "picture" in item else item["pixel_values"]).shape[-2:])
        if size not in open_batches and len(open_batches) == max_open:
            yield out(open_batches.pop(next(iter(open_batches))))
        open_batches.setdefault(size, []).append(item)
        if len(open_batches[size]) == batch_size:
            yield out(open_batches.pop(size))
    for batch in open_batches.values():
        yield out(batch)
    if failed:
        yield out([])


class SizedBatches(IterableDataset):
    """A stream's items as :func:`same_size_batches` (each worker batches its own share)."""

    def __init__(self, stream: IterableDataset, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return same_size_batches(iter(self.stream), self.batch_size)


class PairDataModule(L.LightningDataModule):
    """Predict-only data module streaming a source of pairs (or, with ``questions``, of questions for an answer
    adapter); each rank takes its share at ``setup``.

    ``skip_ids``: the ids already done, or a function giving them when the loader is made.
    """

    def __init__(
        self,
        source: PairSource,
        backbone: Any,
        *,
        run_seed: int,
        batch_size: int = 8,
        num_workers: int = 0,
        skip_ids: set[str] | frozenset | Callable[[], set[str]] = frozenset(),
        questions: bool = False,
    ):
        super().__init__()
        capability = "questions" if questions else "preprocessing"
        require(backbone, capability, "a PairDataModule" + (" of questions" if questions else ""))  # not in a worker
        self.dataset = (QuestionStream if questions else PairStream)(source, backbone, run_seed)
        self.skip_ids = skip_ids
        self.pad_id = backbone.pad_token_id
        self.batch_size, self.num_workers = batch_size, num_workers
        self.collate = partial(collate_questions, pad_id=self.pad_id, backbone=backbone) if questions else partial(
            collate_attribution, pad_id=self.pad_id)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.dataset.rank, self.dataset.world_size = self.trainer.global_rank, self.trainer.world_size

    def predict_dataloader(self) -> DataLoader:
        """``skip_ids`` is read here, after every setup hook: a run's owner knows what is done only once it holds the output."""
        self.dataset.skip_ids = self.skip_ids() if callable(self.skip_ids) else self.skip_ids
        # batched here, one picture size per batch; the loader only collates (batch_size=None)
        return DataLoader(SizedBatches(self.dataset, self.batch_size), batch_size=None, num_workers=self.num_workers,
                          collate_fn=self.collate)
