"""What an attribution run reports at its end, gathered while it runs: counts, throughput, localisation.

Nothing here reads the output back: each rank keeps torchmetrics states that are
synced across ranks once, at the end of predict, on every rank.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torchmetrics.aggregation import MaxMetric, SumMetric

from m2ib_lightning.baselines import random_image_maps
from m2ib_lightning.data.attribution import sample_seed
from m2ib_lightning.engine import image_maps_from_capacity
from m2ib_lightning.metrics import MaskEnergy, PointingGame


def processed(batch_or_outputs: dict[str, Any]) -> int:
    """Items a batch settled: attributed samples plus records that failed."""
    return len(batch_or_outputs["id"]) + sum(f["severity"] == "error" for f in batch_or_outputs["failures"])


class RunSummary(L.Callback):
    """Counts (done, failed, warnings), wall time and samples/s summed over ranks, and, for the samples
    with ground truth (the world's objects, a manifest's masks or boxes), pointing game and mask energy
    of the M2IB maps next to the random baseline's maps (seeded per sample id, so the same on any topology, and
    the maps of the `random` method of an evaluation with the same seed).

    ``result`` is set on every rank at the end of predict.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.counts = {name: SumMetric() for name in ("done", "failed", "warnings")}
        self.wall = MaxMetric()
        self.maps = {name: (PointingGame(), MaskEnergy()) for name in ("m2ib", "random")}
        self.result: dict[str, Any] | None = None
        self.start = 0.0

    def _metrics(self):
        yield from self.counts.values()
        yield self.wall
        for pair in self.maps.values():
            yield from pair

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self._metrics():
            metric.to(pl_module.device)  # states must live where the process group syncs (NCCL: on the GPU)
        for count in self.counts.values():
            count.update(0.0)  # a rank with nothing left to do (a finished run, rerun) still has its counts
        self.start = time.perf_counter()

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict[str, Any], batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        severities = [f["severity"] for f in outputs["failures"]]
        self.counts["done"].update(len(outputs["id"]))
        self.counts["failed"].update(severities.count("error"))
        self.counts["warnings"].update(severities.count("warning"))
        if "target_mask" not in outputs or not outputs["has_target"].any():
            return
        rows = outputs["has_target"]
        masks = outputs["target_mask"][rows]
        grid = outputs["image_capacity"][rows]
        maps = {
            "m2ib": image_maps_from_capacity(grid.flatten(1), tuple(grid.shape[-2:]), tuple(masks.shape[-2:])),
            "random": random_image_maps([torch.Generator().manual_seed(sample_seed(self.seed, i))  # the evaluation's
                                         for i, has in zip(outputs["id"], rows.tolist()) if has], tuple(masks.shape[-2:])),
        }
        device = pl_module.device
        for name, (pointing, energy) in self.maps.items():
            pointing.update(maps[name].to(device), masks.to(device))
            energy.update(maps[name].to(device), masks.to(device))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.wall.update(time.perf_counter() - self.start)
        counts = {name: int(metric.compute().item()) for name, metric in self.counts.items()}
        wall = float(self.wall.compute().item())
        localisation, with_truth = None, self.maps["m2ib"][0].samples()
        if with_truth:
            localisation = {
                name: {"pointing_game": round(p.compute().item(), 4), "energy": round(e.compute().item(), 4)}
                for name, (p, e) in self.maps.items()
            }
        self.result = {
            **counts,
            "wall_time_s": round(wall, 2),
            "samples_per_s": round((counts["done"] + counts["failed"]) / wall, 3) if wall > 0 else None,
            "localisation": localisation,
            "localisation_pairs": with_truth,
        }


class SampleProgressBar(TQDMProgressBar):
    """Lightning's progress bar counted in samples over the whole dataset, with samples/s and ETA.

    Rank 0 draws it; its own progress times the number of ranks stands for the whole run's.
    ``total`` gives the number of samples left to do when predict starts (None where the source cannot tell).
    """

    def __init__(self, total: Callable[[], int] | None, **kwargs):
        super().__init__(**kwargs)
        self.left, self.total, self.count = total, None, 0

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self.total = None if self.left is None else self.left()

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit, bar.unit_scale = "samples", True
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            self.predict_progress_bar.reset(total=self.total)
            self.predict_progress_bar.set_description(self.predict_description)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        step = processed(outputs) * trainer.world_size
        self.count += step
        if self.predict_progress_bar is not None and not self.predict_progress_bar.disable:
            self.predict_progress_bar.update(step)
