"""What an attribution run reports at its end, gathered while it runs: counts, throughput, localisation.

Nothing here reads the output back: each rank keeps torchmetrics states that are
synced across ranks once, at the end of predict, on every rank.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torchmetrics.aggregation import MaxMetric, MeanMetric, SumMetric

from m2ib_lightning.amortised.fidelity import AGREEMENT_KEYS
from m2ib_lightning.baselines import random_image_maps
from m2ib_lightning.data.attribution import sample_seed
from m2ib_lightning.engine import image_maps_from_capacity
from m2ib_lightning.metrics import MaskEnergy, PointingGame
from m2ib_lightning.results import index_path


def processed(batch_or_outputs: dict[str, Any]) -> int:
    """Items a batch settled: attributed samples plus records that failed."""
    return len(batch_or_outputs["id"]) + sum(f["severity"] == "error" for f in batch_or_outputs["failures"])


class RunProgress(L.Callback):
    """How much of the run is done, over all ranks and never more than was: this rank's settled items, plus the index
    lines every other rank appended since predict started (read on from where the last look stopped, so a look costs
    what was appended since; another rank's samples count once its shard commits). With ``left`` (the items left
    when predict starts, None where the source cannot tell): percent done and ETA.

    The progress bar, TensorBoard and the run summary read it (rank 0 shows them).
    """

    def __init__(self, output_dir: str | Path, left: Callable[[], int | None] | None = None):
        self.output_dir, self.left = Path(output_dir), left
        self.total: int | None = None
        self.own, self.others, self.start = 0, 0, 0.0
        self.offsets: dict[int, int] = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total = None if self.left is None else self.left()
        self.own, self.others, self.start = 0, 0, time.perf_counter()
        self.offsets = {}
        for rank in range(trainer.world_size):
            if rank != trainer.global_rank:
                path = index_path(self.output_dir, rank)
                self.offsets[rank] = path.stat().st_size if path.exists() else 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.own += processed(outputs)

    def done(self) -> int:
        """Items settled by this run so far, over all ranks."""
        for rank, offset in self.offsets.items():
            path = index_path(self.output_dir, rank)
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    new = handle.read()
            except FileNotFoundError:
                continue
            end = new.rfind(b"\n") + 1  # a half-written last line counts once it is whole
            self.others += new[:end].count(b"\n")
            self.offsets[rank] = offset + end
        return self.own + self.others

    def percent_done(self) -> float | None:
        """Percent of the total settled, as of the last :meth:`done` (None without a total)."""
        if not self.total:
            return None
        return min(100.0, 100.0 * (self.own + self.others) / self.total)

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far, as of the last :meth:`done` (None without a total or before anything is
        done)."""
        done = self.own + self.others
        if not self.total or done == 0:
            return None
        return max(self.total - done, 0) / (done / (time.perf_counter() - self.start))


def run_progress(trainer: L.Trainer) -> RunProgress | None:
    """The trainer's :class:`RunProgress`, where the run has one."""
    return next((c for c in trainer.callbacks if isinstance(c, RunProgress)), None)


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
        self.audit = {name: MeanMetric(nan_strategy="ignore") for name in AGREEMENT_KEYS}  # amortised vs exact
        self.audited = SumMetric()
        self.result: dict[str, Any] | None = None
        self.start = 0.0

    def _metrics(self):
        yield from self.counts.values()
        yield self.wall
        for pair in self.maps.values():
            yield from pair
        yield from self.audit.values()
        yield self.audited

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self._metrics():
            metric.to(pl_module.device)  # states must live where the process group syncs (NCCL: on the GPU)
        for count in (*self.counts.values(), self.audited):
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
        if "audit" in outputs:
            self.audited.update(len(outputs["audit"]["rows"]))
            for name, metric in self.audit.items():
                metric.update(outputs["audit"][name].to(pl_module.device))
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
        audited = int(self.audited.compute().item())
        audit = {"samples": audited, **{f"{name}_mean": round(m.compute().item(), 4) for name, m in self.audit.items()}
                 } if audited else None
        progress = run_progress(trainer)
        settled = counts["done"] + counts["failed"]
        total = None if progress is None else progress.total
        self.result = {
            **counts,
            "samples_left_at_start": total,
            "percent_done": None if not total else round(min(100.0, 100.0 * settled / total), 2),
            "wall_time_s": round(wall, 2),
            "samples_per_s": round((counts["done"] + counts["failed"]) / wall, 3) if wall > 0 else None,
            "localisation": localisation,
            "localisation_pairs": with_truth,
            "audit": audit,  # an amortised run with m2ib.audit_every: its agreement with the exact fit
        }


class SampleProgressBar(TQDMProgressBar):
    """Lightning's progress bar counted in samples over the whole dataset, with samples/s and ETA: what the run's
    :class:`RunProgress` says is done over all ranks (rank 0 draws it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.progress: RunProgress | None = None
        self.total, self.count = None, 0

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self.progress = run_progress(trainer)
        self.total = None if self.progress is None else self.progress.total

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit, bar.unit_scale = "samples", True
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            self.predict_progress_bar.reset(total=self.total)
            self.predict_progress_bar.set_description(self.predict_description)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        done = self.progress.done() if self.progress is not None else self.count + processed(outputs)
        step, self.count = done - self.count, done
        if self.predict_progress_bar is not None and not self.predict_progress_bar.disable:
            self.predict_progress_bar.update(step)
