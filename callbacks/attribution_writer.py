"""Export of attribution maps: per-rank safetensors shards, an index, optional PNG overlays."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import save_file

from m2ib_lightning.engine import minmax
from m2ib_lightning.results import OVERLAY_DIR, SHARD_DIR, atomic_write, failures_path, index_path, safe_name
from m2ib_lightning.visualize import prediction_figure


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append in one write, flushed to disk: a batch's lines land together."""
    with open(path, "a") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())


def _cut_partial_line(path: Path) -> None:
    """Drop a last line left half-written by a killed run, so that new lines start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write(path, data[: data.rfind(b"\n") + 1])


class AttributionWriter(BasePredictionWriter):
    """Writes each predict batch as it finishes; see ``m2ib_lightning.results`` for the layout.

    ``display_image`` (the adapter's) turns pixel values back into a picture for overlays.
    """

    def __init__(self, output_dir: str | Path, *, overlays: bool = True, display_image: Callable | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overlays = overlays and display_image is not None
        self.display_image = display_image
        self.run_token = f"{time.time_ns():x}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        (self.output_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if self.overlays:
            (self.output_dir / OVERLAY_DIR).mkdir(exist_ok=True)
        for path in (index_path(self.output_dir, trainer.global_rank), failures_path(self.output_dir, trainer.global_rank)):
            _cut_partial_line(path)

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
        batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        rank = trainer.global_rank
        if prediction["failures"]:
            _append_lines(failures_path(self.output_dir, rank), [json.dumps(f) + "\n" for f in prediction["failures"]])
        if not prediction["id"]:
            return
        shard = f"rank{rank}-{self.run_token}-{batch_idx:06d}.safetensors"
        capacity = prediction["image_capacity"]
        tensors = {
            "image_capacity": capacity.contiguous(),
            "image_map_grid": minmax(capacity).contiguous(),
            "image_token_capacity": prediction["image_token_capacity"].clone(),  # for SigLIP the same storage as the grid
            "text_capacity": prediction["text_capacity"].contiguous(),
            "text_map": prediction["text_maps"].contiguous(),
        }
        atomic_write(self.output_dir / SHARD_DIR / shard, lambda tmp: save_file(tensors, str(tmp)))

        lines = []
        for row, sample_id in enumerate(prediction["id"]):
            length = int(prediction["lengths"][row])
            lines.append(json.dumps({
                "id": sample_id,
                "text": prediction["text"][row],
                "tokens": prediction["tokens"][row][:length],
                "special": prediction["special"][row][:length],
                "shard": shard,
                "row": row,
                "length": length,
                "image_size": list(prediction["image_size"]),
                "patch_grid": list(prediction["patch_grid"]),
                "image_fit": float(prediction["image_fit"][row]),
                "text_fit": float(prediction["text_fit"][row]),
            }) + "\n")
            if self.overlays:
                self._write_overlay(prediction, row)
        _append_lines(index_path(self.output_dir, rank), lines)

    def _write_overlay(self, prediction: dict[str, Any], row: int) -> None:
        figure = prediction_figure(prediction, row, self.display_image)
        path = self.output_dir / OVERLAY_DIR / f"{safe_name(prediction['id'][row])}.png"
        atomic_write(path, lambda tmp: figure.save(tmp, format="PNG"))
