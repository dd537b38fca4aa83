"""Export of attribution maps: rolling per-rank safetensors shards, an append-only index, the first N overlays."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import save_file

from m2ib_lightning.engine import minmax
from m2ib_lightning.results import (
    OVERLAY_DIR, SHARD_DIR, append_lines, atomic_write, cut_partial_line, failures_path, index_path, safe_name,
)
from m2ib_lightning.visualize import prediction_figure


def _pad_stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """1-D rows of different lengths as one zero-padded (N, longest) tensor."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class AttributionWriter(BasePredictionWriter):
    """Writes the samples of each rank into rolling shards; see ``m2ib_lightning.results`` for the layout.

    A shard is closed (written, renamed into place, then indexed) every
    ``samples_per_shard`` samples, at the end of the run, and when the run stops on
    an exception; a kill loses only the open shard, which the rerun redoes. The
    first ``overlays`` samples of each rank get a PNG overlay in ``overlays/rankR/``;
    ``display_image`` (the adapter's) turns pixel values back into a picture.
    ``run_token`` names this run in shard names and failure reports (the same on every rank).
    """

    def __init__(
        self, output_dir: str | Path, *, samples_per_shard: int = 1024, overlays: int = 0,
        display_image: Callable | None = None, run_token: str | None = None,
    ):
        super().__init__(write_interval="batch")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        self.samples_per_shard = samples_per_shard
        self.overlays = overlays if display_image is not None else 0
        self.display_image = display_image
        self.run_token = run_token or f"{time.time_ns():x}"
        self.rank, self.shards_written, self.overlays_written = 0, 0, 0
        self.open: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank
        (self.output_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if self.overlays:
            (self.output_dir / OVERLAY_DIR / f"rank{self.rank}").mkdir(parents=True, exist_ok=True)
        for path in (index_path(self.output_dir, self.rank), failures_path(self.output_dir, self.rank)):
            cut_partial_line(path)

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
        batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if prediction["failures"]:
            lines = [json.dumps({**f, "run": self.run_token}) + "\n" for f in prediction["failures"]]
            append_lines(failures_path(self.output_dir, self.rank), lines)
        for row, sample_id in enumerate(prediction["id"]):
            length = int(prediction["lengths"][row])
            self.open.append({
                "entry": {
                    "id": sample_id,  # first: start-up reads only this
                    "text": prediction["text"][row],
                    "tokens": prediction["tokens"][row][:length],
                    "special": prediction["special"][row][:length],
                    "length": length,
                    "image_size": list(prediction["image_size"]),
                    "patch_grid": list(prediction["patch_grid"]),
                    "geometry": prediction["geometry"][row],
                    "image_fit": float(prediction["image_fit"][row]),
                    "text_fit": float(prediction["text_fit"][row]),
                },
                "image_capacity": prediction["image_capacity"][row],
                "image_token_capacity": prediction["image_token_capacity"][row],
                "text_capacity": prediction["text_capacity"][row, :length],
                "text_map": prediction["text_maps"][row, :length],
            })
            if self.overlays_written < self.overlays:
                self._write_overlay(prediction, row)
            if len(self.open) == self.samples_per_shard:
                self.close_shard()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close_shard()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close_shard()  # what is fitted is kept; the rerun does the rest

    def close_shard(self) -> None:
        """Write the open samples as one shard, rename it into place, then index them in one fsynced append."""
        if not self.open:
            return
        samples, self.open = self.open, []
        name = f"rank{self.rank}-{self.run_token}-{self.shards_written:05d}.safetensors"
        capacity = torch.stack([s["image_capacity"] for s in samples]).contiguous()
        tensors = {
            "image_capacity": capacity,
            "image_map_grid": minmax(capacity).contiguous(),
            "image_token_capacity": torch.stack([s["image_token_capacity"] for s in samples]).contiguous(),
            "text_capacity": _pad_stack([s["text_capacity"] for s in samples]),
            "text_map": _pad_stack([s["text_map"] for s in samples]),
        }
        atomic_write(self.output_dir / SHARD_DIR / name, lambda tmp: save_file(tensors, str(tmp)))
        lines = [json.dumps({**s["entry"], "shard": name, "row": row}) + "\n" for row, s in enumerate(samples)]
        append_lines(index_path(self.output_dir, self.rank), lines)
        self.shards_written += 1

    def _write_overlay(self, prediction: dict[str, Any], row: int) -> None:
        figure = prediction_figure(prediction, row, self.display_image)
        path = self.output_dir / OVERLAY_DIR / f"rank{self.rank}" / f"{safe_name(prediction['id'][row])}.png"
        atomic_write(path, lambda tmp: figure.save(tmp, format="PNG"))
        self.overlays_written += 1
