"""Export of attribution maps: rolling per-rank safetensors shards, an append-only index, the first N overlays."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import save_file

from m2ib_lightning.amortised.fidelity import AGREEMENT_KEYS
from m2ib_lightning.engine import minmax
from m2ib_lightning.results import (
    OVERLAY_DIR, SHARD_DIR, append_lines, atomic_write, cut_partial_line, failures_path, index_path, pending_path,
    pending_ranks, safe_name, settle_pending,
)
from m2ib_lightning.viz.figures import prediction_figure


def _finite_or_none(value: torch.Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of one shape stacked; rows of different shapes (texts of other lengths, patch grids of other pictures)
    zero-padded to the largest in each dimension: the index entry's ``length`` and ``patch_grid`` say what is real."""
    if all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows).contiguous()
    shape = [max(r.shape[d] for r in rows) for d in range(rows[0].dim())]
    out = torch.zeros(len(rows), *shape, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[(i, *(slice(0, n) for n in row.shape))] = row
    return out


class RollingShardWriter(BasePredictionWriter):
    """Writes each rank's samples into rolling shards with an append-only index; see ``m2ib_lightning.results``.

    A shard is closed (written, renamed into place, then indexed) every
    ``samples_per_shard`` samples, once its first sample is ``shard_seconds`` old (so a
    kill loses minutes of work, not a shard's worth of hours), at the end of the run,
    and when the run stops on an exception; a kill loses only the open shard, which
    the rerun redoes.
    ``run_token`` names this run in shard names and failure reports (the same on every rank).
    Subclasses say what a prediction's samples are (:meth:`samples`).
    """

    def __init__(self, output_dir: str | Path, *, samples_per_shard: int = 1024, shard_seconds: float = 300.0,
                 run_token: str | None = None):
        super().__init__(write_interval="batch")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if shard_seconds <= 0:
            raise ValueError(f"shard_seconds must be > 0, got {shard_seconds}")
        self.output_dir = Path(output_dir)
        self.samples_per_shard, self.shard_seconds = samples_per_shard, shard_seconds
        self.opened_at = 0.0  # when the open shard got its first sample (monotonic clock)
        self.run_token = run_token or f"{time.time_ns():x}"
        self.rank, self.shards_written = 0, 0
        self.open: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank
        self.run_token = trainer.strategy.broadcast(self.run_token)  # rank 0's: one name for this run on every rank
        (self.output_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        for path in (index_path(self.output_dir, self.rank), failures_path(self.output_dir, self.rank)):
            cut_partial_line(path)
        for rank in pending_ranks(self.output_dir):  # of any earlier topology: each settled by one rank of this one
            if rank % trainer.world_size == self.rank:
                settle_pending(self.output_dir, rank)

    def samples(self, prediction: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """(index entry, id first; tensors) of each sample of a prediction."""
        raise NotImplementedError

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
        batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if prediction["failures"]:
            lines = [json.dumps({**f, "run": self.run_token}) + "\n" for f in prediction["failures"]]
            append_lines(failures_path(self.output_dir, self.rank), lines)
        for sample in self.samples(prediction):
            if not self.open:
                self.opened_at = time.monotonic()
            self.open.append(sample)
            if len(self.open) == self.samples_per_shard:
                self.close_shard()
        if self.open and time.monotonic() - self.opened_at >= self.shard_seconds:
            self.close_shard()  # a slow run keeps its work: at most shard_seconds of it is open at any time

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close_shard()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close_shard()  # what is done is kept; the rerun does the rest

    def close_shard(self) -> None:
        """Write the open samples as one shard, rename it into place, then index them in one fsynced append."""
        if not self.open:
            return
        samples, self.open = self.open, []
        name = f"rank{self.rank}-{self.run_token}-{self.shards_written:05d}.safetensors"
        tensors = {key: _stack([t[key] for _, t in samples]) for key in samples[0][1]}
        shards = self.output_dir / SHARD_DIR
        pending = pending_path(self.output_dir, self.rank)
        atomic_write(pending, name, tmp=pending.with_name(pending.name + ".tmp"))  # a kill from here to the index
        # append leaves an orphan shard, which the next run removes
        atomic_write(shards / name, lambda tmp: save_file(tensors, str(tmp)), tmp=shards / f".{name}.tmp")
        lines = [json.dumps({**entry, "shard": name, "row": row}) + "\n" for row, (entry, _) in enumerate(samples)]
        append_lines(index_path(self.output_dir, self.rank), lines)
        pending.unlink()
        self.shards_written += 1


class AttributionWriter(RollingShardWriter):
    """M2IB's maps of an attribution run (of pairs, or of questions and their answers); the first ``overlays`` samples of each rank also get a PNG overlay in
    ``overlays/rankR/``, drawn with ``display_image`` (the adapter's: pixel values back to a picture)."""

    def __init__(
        self, output_dir: str | Path, *, samples_per_shard: int = 1024, shard_seconds: float = 300.0, overlays: int = 0,
        display_image: Callable | None = None, run_token: str | None = None,
    ):
        super().__init__(output_dir, samples_per_shard=samples_per_shard, shard_seconds=shard_seconds, run_token=run_token)
        self.overlays = overlays if display_image is not None else 0
        self.display_image = display_image
        self.overlays_written = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.overlays:
            (self.output_dir / OVERLAY_DIR / f"rank{self.rank}").mkdir(parents=True, exist_ok=True)

    def samples(self, prediction: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        out = []
        for row, sample_id in enumerate(prediction["id"]):
            length = int(prediction["lengths"][row])
            capacity = prediction["image_capacity"][row]
            entry = {
                "id": sample_id,  # first: start-up reads only this
                "text": prediction["text"][row],
                "tokens": prediction["tokens"][row][:length],
                "special": prediction["special"][row][:length],
                "length": length,
                "image_size": list(prediction["image_size"]),
                "patch_grid": list(prediction["patch_grid"]),
                "geometry": prediction["geometry"][row],
                "image_fit": _finite_or_none(prediction["image_fit"][row]),  # None: an amortised explainer ran no fit
                "text_fit": _finite_or_none(prediction["text_fit"][row]),
            }
            audit = prediction.get("audit")
            if audit is not None and row in audit["rows"]:  # also fitted exactly: how well the explainer agreed
                at = audit["rows"].index(row)
                entry["audit"] = {k: _finite_or_none(audit[k][at]) for k in AGREEMENT_KEYS}
            if "answer" in prediction:  # a VQA run: the answer explained, and whether it was given or the model's own
                entry["answer"], entry["answer_source"] = prediction["answer"][row], prediction["answer_source"][row]
            target_class = prediction.get("target_class", [None] * (row + 1))[row]
            if target_class is not None:  # what the ground truth shows (a manifest's "class", the world's shape)
                entry["class"] = target_class
            tensors = {
                "image_capacity": capacity,
                "image_map_grid": minmax(capacity[None])[0],
                "image_token_capacity": prediction["image_token_capacity"][row],
                "text_capacity": prediction["text_capacity"][row, :length],
                "text_map": prediction["text_maps"][row, :length],
            }
            out.append((entry, tensors))
            if self.overlays_written < self.overlays:
                self._write_overlay(prediction, row)
        return out

    def _write_overlay(self, prediction: dict[str, Any], row: int) -> None:
        figure = prediction_figure(prediction, row, self.display_image)
        path = self.output_dir / OVERLAY_DIR / f"rank{self.rank}" / f"{safe_name(prediction['id'][row])}.png"
        atomic_write(path, lambda tmp: figure.save(tmp, format="PNG"))
        self.overlays_written += 1
