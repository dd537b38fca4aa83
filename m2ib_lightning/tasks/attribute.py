"""An attribution run: M2IB over a manifest or held-out pairs of the shapes world, exported, logged, scored."""

from __future__ import annotations

import json
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from callbacks import AttributionWriter, TensorBoardAttributionLogger

from ..data.attribution import PairDataModule, world_index, world_records
from ..data.manifest import read_pairs
from ..data.world import ShapesWorld
from ..engine import M2IBConfig
from ..metrics import MaskEnergy, PointingGame
from ..module import M2IBModule
from .common import backbone_of, check_layers, prepare_output, refuse_other_settings, world_of
from ..results import FAILURES_FILE, atomic_write, done_ids, failures_path, merged_failures, read_attributions

#: Settings that change the maps: a rerun into the same output_dir must keep them.
RESULT_KEYS = ("seed", "model", "m2ib", "world")


def localisation(records: list, world: ShapesWorld, seed: int) -> dict[str, dict[str, float]]:
    """Pointing game and mask energy of the M2IB maps and of uniformly random maps, against the caption's objects."""
    # Rank 0 scores the maps of every rank, read back from disk: nothing to sync across processes.
    metrics = {name: (PointingGame(sync_on_compute=False), MaskEnergy(sync_on_compute=False)) for name in ("m2ib", "random")}
    gen = torch.Generator().manual_seed(seed)
    for record in records:
        mask = torch.from_numpy(world.sample(world_index(record.id)).target_mask)[None]
        if mask.shape[-2:] != record.image_map.shape:
            raise ValueError(f"maps are {tuple(record.image_map.shape)} but the world's masks {tuple(mask.shape[-2:])}")
        maps = {"m2ib": record.image_map[None], "random": torch.rand(mask.shape, generator=gen)}
        for name, (pointing, energy) in metrics.items():
            pointing.update(maps[name], mask)
            energy.update(maps[name], mask)
    return {
        name: {"pointing_game": round(p.compute().item(), 4), "energy": round(e.compute().item(), 4)}
        for name, (p, e) in metrics.items()
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    backbone = backbone_of(cfg)
    check_layers(cfg, backbone)  # before anything is written
    refuse_other_settings(cfg, RESULT_KEYS)
    out = prepare_output(cfg, save_config=False)  # rank 0 saves it once the run is known to be resumable
    world = None
    if cfg.data.manifest:
        records, upfront_failures = read_pairs(cfg.data.manifest)
    else:
        world = world_of(cfg)
        records, upfront_failures = world_records(world, cfg.data.num_samples), []
    already = done_ids(out)
    datamodule = PairDataModule(
        records, backbone, run_seed=cfg.seed, batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers, skip_ids=already,
    )
    module = M2IBModule(backbone, M2IBConfig(**cfg.m2ib))
    display_image = getattr(backbone, "display_image", None)
    trainer = L.Trainer(
        inference_mode=False,
        logger=TensorBoardLogger(str(out), name="tensorboard", version=""),
        callbacks=[
            AttributionWriter(out, overlays=cfg.export.overlays, display_image=display_image),
            TensorBoardAttributionLogger(every_n_batches=cfg.export.tensorboard_every_n_batches, display_image=display_image),
        ],
        **OmegaConf.to_container(cfg.trainer),
    )
    if trainer.global_rank == 0:
        atomic_write(out / "config.yaml", OmegaConf.to_yaml(cfg))
        lines = "".join(json.dumps(f.to_json()) + "\n" for f in upfront_failures)
        atomic_write(failures_path(out, "manifest"), lines)
    start = time.perf_counter()
    if len(datamodule.dataset):
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        trainer.strategy.barrier()  # every rank has written its shards before rank 0 reads them
    wall = time.perf_counter() - start
    if trainer.global_rank != 0:
        return {}

    results = list(read_attributions(out))
    failures = merged_failures(out)
    atomic_write(out / FAILURES_FILE, "".join(json.dumps(f) + "\n" for f in failures))
    run_ids = {r.id for r in records}
    errors = {f["id"] for f in failures if f["severity"] == "error"}
    summary = {
        "output_dir": str(out),
        "done": len(run_ids & {r.id for r in results}) - len(already & run_ids),
        "skipped": len(already & run_ids),
        "failed": len(errors),
        "warnings": sum(f["severity"] == "warning" for f in failures),
        "total_in_output": len(results),
        "wall_time_s": round(wall, 2),
        "samples_per_s": round(len(datamodule.dataset) / wall, 3) if len(datamodule.dataset) and wall > 0 else None,
        "localisation": localisation(results, world, cfg.seed) if world is not None else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    _print_report(summary)
    return summary


def _print_report(summary: dict[str, Any]) -> None:
    print(f"\nM2IB attribution run: {summary['output_dir']}")
    print(f"  {summary['done']} attributed, {summary['skipped']} already done, {summary['failed']} failed "
          f"({summary['warnings']} warnings, see {FAILURES_FILE}); "
          f"{summary['wall_time_s']} s ({summary['samples_per_s']} samples/s)")
    if summary["localisation"]:
        print(f"  localisation over {summary['total_in_output']} held-out pairs (caption's objects as ground truth):")
        print("  | map | pointing game | energy in mask |")
        print("  |---|---|---|")
        for name, values in summary["localisation"].items():
            print(f"  | {name} | {values['pointing_game']:.3f} | {values['energy']:.3f} |")
    print(f"  maps: {summary['output_dir']}/shards, overlays: {summary['output_dir']}/overlays, "
          f"TensorBoard: tensorboard --logdir {summary['output_dir']}/tensorboard\n")
