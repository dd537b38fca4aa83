"""An attribution run: M2IB over the shapes world, a manifest or WebDataset shards, exported, logged, scored.

The run streams: each rank reads its share of the source, skips ids already in
the output (the only thing read at start-up), writes rolling shards, and keeps
running aggregates; the summary at the end comes from those aggregates, synced
across ranks, never from reading the output back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ..callbacks import AttributionWriter, RunSummary, TensorBoardAttributionLogger
from ..data.attribution import PairDataModule, QuestionWorldSource, WorldSource
from ..modules import AnswerM2IBModule, M2IBModule
from ..results import FAILURES_FILE, atomic_write, merged_failures
from .schema import AnswerSettings, ExportConfig, ModelConfig, RunData, RunM2IB, WorldConfig, engine_config
from ..config import ConfigError
from .common import backbone_of, check_layers, output_owner, owned_trainer, source_of

#: Settings that change the maps: a rerun into the same output_dir must keep them.
RESULT_KEYS = ("seed", "model", "m2ib", "world")
WORLD_OVERLAYS = 64  # export.overlays unset: overlays of the first 64 world samples per rank, none for user data

# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class AttributeConfig:
    task: str = "attribute"
    seed: int = 0
    threads: Optional[int] = None  # intra-op threads per process; unset: the first run's (kept in run.json)
    output_dir: str = "runs/default"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: RunData = field(default_factory=RunData)
    model: ModelConfig = field(default_factory=ModelConfig)
    m2ib: RunM2IB = field(default_factory=RunM2IB)  # the engine's own settings, and the explainer
    export: ExportConfig = field(default_factory=ExportConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AttributeVQAData(RunData):
    manifest: Optional[str] = None  # JSONL/CSV: id, image, question, answer (optional), mask or boxes (optional), class
    num_samples: int = 64  # without a manifest: this many held-out questions of the shapes world (each names an object)
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "what_colour", "what_shape", "what_size"])


@dataclass
class AttributeVQAConfig(AttributeConfig):
    task: str = "attribute_vqa"
    output_dir: str = "runs/attribute_shapes_vqa"
    data: AttributeVQAData = field(default_factory=AttributeVQAData)
    answers: AnswerSettings = field(default_factory=AnswerSettings)


#: this module's tasks and their schemas
SCHEMAS = {"attribute": AttributeConfig, "attribute_vqa": AttributeVQAConfig}


def run(cfg: DictConfig) -> dict[str, Any]:
    """An attribution run of pairs (``task: attribute``) or of questions and their answers (``task: attribute_vqa``)."""
    entered = time.perf_counter()
    questions = cfg.task == "attribute_vqa"
    backbone = backbone_of(cfg, "questions" if questions else "preprocessing")
    check_layers(cfg, backbone)  # before anything is written
    module = _module(cfg, backbone, questions)  # ... and an explainer that does not fit the backbone is refused
    source = source_of(cfg, questions=questions)
    world_run = isinstance(source, (WorldSource, QuestionWorldSource))
    out = Path(cfg.output_dir)
    display_image = getattr(backbone, "display_image", None)
    overlays = cfg.export.overlays if cfg.export.overlays is not None else (WORLD_OVERLAYS if world_run else 0)
    owner = output_owner(cfg, RESULT_KEYS + (("answers", "data.kinds") if questions else ()), backbone.module, source=source)
    writer = AttributionWriter(out, samples_per_shard=cfg.export.samples_per_shard, shard_seconds=cfg.export.shard_seconds,
                                overlays=overlays, display_image=display_image)
    summary_callback = RunSummary(cfg.seed)
    callbacks = [
        writer, summary_callback,
        TensorBoardAttributionLogger(every_n_batches=cfg.export.tensorboard_every_n_batches, display_image=display_image,
                                     step_offset=lambda: owner.done_count),
    ]
    trainer = owned_trainer(cfg, owner, callbacks, source, {"default_hp_metric": False})
    datamodule = PairDataModule(
        source, backbone, run_seed=cfg.seed, batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers, skip_ids=lambda: owner.done, questions=questions,
    )
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        if trainer.global_rank != 0:
            return {}
        phases = {"startup_s": summary_callback.start - entered, "predict_s": summary_callback.result["wall_time_s"]}
        return _finish(cfg, trainer, writer.run_token, summary_callback.result, owner.done_count, phases, time.perf_counter())
    finally:
        owner.release()


def _module(cfg: DictConfig, backbone: Any, questions: bool) -> L.LightningModule:
    """The run's module: exact fits, or an amortised explainer (refused here if it was trained for another
    backbone or other settings), of pairs or of questions."""
    m2ib = engine_config(cfg.m2ib)
    explainer = None if cfg.m2ib.explainer == "exact" else cfg.m2ib.explainer
    try:
        if questions:
            return AnswerM2IBModule(backbone, m2ib, max_new_tokens=cfg.answers.max_new_tokens, explainer=explainer,
                                    audit_every=cfg.m2ib.audit_every)
        return M2IBModule(backbone, m2ib, explainer=explainer, audit_every=cfg.m2ib.audit_every)
    except (OSError, ValueError) as err:
        raise ConfigError(f"m2ib.explainer={cfg.m2ib.explainer!r}: {err}") from err


def _finish(
    cfg: DictConfig, trainer: L.Trainer, run_token: str, totals: dict[str, Any], already: int,
    phases: dict[str, float], predicted_at: float,
) -> dict[str, Any]:
    """Rank 0: failures.jsonl, summary.json, the final TensorBoard scalars and hparams, and the printed report.

    ``phases`` holds the seconds of start-up (entering the run to the first batch) and of predict; the
    seconds of this finishing step (from ``predicted_at``) are added to it.
    """
    out = Path(cfg.output_dir)
    failures = merged_failures(out, run_token)
    atomic_write(out / FAILURES_FILE, "".join(json.dumps(f) + "\n" for f in failures))
    summary = {
        "output_dir": str(out),
        **totals,
        "failed": sum(f["severity"] == "error" for f in failures),
        "warnings": sum(f["severity"] == "warning" for f in failures),
        "skipped": already,
        "total_in_output": already + totals["done"],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    metrics = {"summary/samples_per_s": summary["samples_per_s"] or 0.0, "summary/done": float(summary["done"]),
               "summary/failed": float(summary["failed"])}
    for name, values in (summary["localisation"] or {}).items():
        metrics.update({f"localisation/{name}_{key}": value for key, value in values.items()})
    trainer.logger.log_hyperparams(_flat_hparams(summary["config"]), metrics=metrics)
    trainer.logger.log_metrics(metrics, step=summary["total_in_output"])
    trainer.logger.finalize("success")
    summary["phases"] = {**{k: round(v, 3) for k, v in phases.items()}, "finish_s": round(time.perf_counter() - predicted_at, 3)}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    _print_report(summary)
    return summary


def _flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as flat ``a.b`` keys with scalar values, as TensorBoard's hparams table takes them."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _print_report(summary: dict[str, Any]) -> None:
    print(f"\nM2IB attribution run: {summary['output_dir']}")
    print(f"  {summary['done']} attributed, {summary['skipped']} already done, {summary['failed']} failed "
          f"({summary['warnings']} warnings, see {FAILURES_FILE}); "
          f"{summary['wall_time_s']} s ({summary['samples_per_s']} samples/s over all ranks)")
    if summary["localisation"]:
        print(f"  localisation over the {summary['localisation_pairs']} pairs of this run with ground truth:")
        print("  | map | pointing game | energy in mask |")
        print("  |---|---|---|")
        for name, values in summary["localisation"].items():
            print(f"  | {name} | {values['pointing_game']:.3f} | {values['energy']:.3f} |")
    print(f"  maps: {summary['output_dir']}/shards, overlays: {summary['output_dir']}/overlays, "
          f"TensorBoard: tensorboard --logdir {summary['output_dir']}/tensorboard\n")
