"""TensorBoard logging of an attribution run: fit curves, final fit values, throughput, overlays and text maps.

Steps count samples of the output directory (samples done before this run, then this run's over all ranks, as
:class:`~callbacks.run_summary.RunProgress` counts them: never more than were done), so the curves of a resumed
run continue where the killed one stopped instead of starting again at 0. Where the total is known, percent done
and the ETA are logged beside the throughput.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from m2ib_lightning.amortised.fidelity import AGREEMENT_KEYS
from m2ib_lightning.viz.figures import display_text, grid, prediction_figure

from .run_summary import RunProgress, processed, run_progress


class TensorBoardAttributionLogger(L.Callback):
    """Logs to the trainer's ``TensorBoardLogger`` (rank 0 only, as Lightning's loggers do).

    ``step_offset``: gives the samples already in the output directory when predict starts.
    """

    def __init__(self, every_n_batches: int = 10, max_figures: int = 4, display_image: Callable | None = None,
                 step_offset: Callable[[], int] = lambda: 0):
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.every_n_batches, self.max_figures = every_n_batches, max_figures
        self.display_image = display_image
        self.step_offset, self.step = step_offset, 0
        self.samples, self.start = 0, 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples, self.start, self.offset = 0, time.perf_counter(), self.step_offset()
        self.step, self.progress = self.offset, run_progress(trainer)
        self.own = 0

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict[str, Any], batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self.own += processed(outputs)
        first = self.step  # samples of the output directory: earlier runs', then this run's over all ranks
        self.step = self.offset + (self.progress.done() if isinstance(self.progress, RunProgress) else self.own)
        settled = self.step - first
        self.samples += len(outputs["id"])
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or trainer.global_rank != 0 or not outputs["id"]:
            return
        writer = logger.experiment
        for name, curve in outputs["curves"].items():  # (steps, B): mean over the batch at each fit step
            steps = curve.shape[0]
            for k, value in enumerate(curve.mean(1).tolist()):  # spread over the batch's samples on the step axis
                writer.add_scalar(f"fit/{name}", value, first + k * settled // steps)
            writer.add_scalar(f"final/{name}", curve[-1].mean().item(), self.step)
        if "audit" in outputs:  # an audited amortised run: the explainer's agreement with the exact fit, as it goes
            for name in AGREEMENT_KEYS:
                values = outputs["audit"][name]
                values = values[~values.isnan()]
                if values.numel():
                    writer.add_scalar(f"audit/{name}", values.mean().item(), self.step)
        if pl_module.last_batch_seconds > 0:
            writer.add_scalar("throughput/batch_samples_per_s", len(outputs["id"]) / pl_module.last_batch_seconds, self.step)
        writer.add_scalar("throughput/rank0_samples_per_s", self.samples / (time.perf_counter() - self.start), self.step)
        if self.progress is not None and self.progress.total:
            writer.add_scalar("progress/percent_done", self.progress.percent_done(), self.step)
            eta = self.progress.eta_s()
            if eta is not None:
                writer.add_scalar("progress/eta_s", eta, self.step)
        if batch_idx % self.every_n_batches == 0:
            writer.add_text("text_maps", self._text_maps(outputs), self.step)
            if self.display_image is not None:
                writer.add_image("maps", np.asarray(self._figures(outputs)), self.step, dataformats="HWC")

    def _rows(self, outputs: dict[str, Any]) -> range:
        return range(min(self.max_figures, len(outputs["id"])))

    def _figures(self, outputs: dict[str, Any]):
        return grid([prediction_figure(outputs, r, self.display_image) for r in self._rows(outputs)])

    def _text_maps(self, outputs: dict[str, Any]) -> str:
        """One markdown line per sample: its id, then each token with its map value (special tokens left out)."""
        lines = []
        for r in self._rows(outputs):
            length = int(outputs["lengths"][r])
            tokens, weights = display_text(outputs["tokens"][r][:length], outputs["special"][r][:length], outputs["text_maps"][r, :length])
            lines.append(f"**{outputs['id'][r]}**: " + " ".join(f"{t} `{w:.2f}`" for t, w in zip(tokens, weights)))
        return "  \n".join(lines)
