"""TensorBoard logging of an attribution run: fit curves, throughput, and overlays every N batches."""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from m2ib_lightning.visualize import grid, prediction_figure


class TensorBoardAttributionLogger(L.Callback):
    """Logs to the trainer's ``TensorBoardLogger`` (rank 0 only, as Lightning's loggers do)."""

    def __init__(self, every_n_batches: int = 10, max_figures: int = 8, display_image: Callable | None = None):
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.every_n_batches, self.max_figures = every_n_batches, max_figures
        self.display_image = display_image
        self.samples, self.start = 0, 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples, self.start = 0, time.perf_counter()

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict[str, Any], batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self.samples += len(outputs["id"])
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or trainer.global_rank != 0 or not outputs["id"]:
            return
        writer = logger.experiment
        steps = None
        for name, curve in outputs["curves"].items():  # (steps, B): mean over the batch at each fit step
            steps = curve.shape[0]
            for step, value in enumerate(curve.mean(1).tolist()):
                writer.add_scalar(f"fit/{name}", value, batch_idx * steps + step)
            writer.add_scalar(f"final/{name}", curve[-1].mean().item(), batch_idx)
        if pl_module.last_batch_seconds > 0:
            writer.add_scalar("throughput/batch_samples_per_s", len(outputs["id"]) / pl_module.last_batch_seconds, batch_idx)
        writer.add_scalar("throughput/run_samples_per_s", self.samples / (time.perf_counter() - self.start), batch_idx)
        if batch_idx % self.every_n_batches == 0 and self.display_image is not None:
            writer.add_image("maps", np.asarray(self._figures(outputs)), batch_idx, dataformats="HWC")

    def _figures(self, outputs: dict[str, Any]):
        rows = range(min(self.max_figures, len(outputs["id"])))
        return grid([prediction_figure(outputs, r, self.display_image) for r in rows])
