"""A comparison run: M2IB and baseline methods on the same pairs through Lightning ``predict``, every method's
maps written, every metric with its standard error, synced across ranks; results.md, results.csv, TensorBoard."""

from __future__ import annotations

from dataclasses import dataclass, field
import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..baselines import METHODS, ExternalMaps, make_method
from ..callbacks import EvaluationWriter
from ..config import ConfigError
from ..data.attribution import PairDataModule
from ..shapes.world import SHAPES
from ..evaluation import COLUMNS, MetricSettings, column_label, higher_is_better
from ..engine import M2IBConfig
from ..modules import EvaluationModule
from ..results import FAILURES_FILE, atomic_write, index_entries, merged_failures
from ..viz.figures import method_grid
from .schema import AnswerSettings, ModelConfig, RunData, WorldConfig
from .common import backbone_of, check_layers, output_owner, owned_trainer, source_of

#: Settings that change the table: a rerun into the same output_dir must keep them.
RESULT_KEYS = ("seed", "model", "m2ib", "world", "methods", "baselines", "metrics")

def build_methods(cfg: DictConfig, backbone: Any) -> dict[str, Any]:
    """The methods ``cfg.methods`` names, from the registry, with their ``cfg.baselines`` settings (m2ib: ``cfg.m2ib``);
    a name no method is registered under, with ``baselines.NAME.maps``, reads maps made elsewhere (:class:`ExternalMaps`).

    The order of ``cfg.methods`` is the order of the table's rows.
    """
    external = {name for name, settings in cfg.baselines.items() if name not in METHODS and "maps" in (settings or {})}
    unknown = sorted(set(cfg.methods) - set(METHODS) - external)
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; registered: {sorted(METHODS)} (maps made elsewhere: name them in "
                          "methods and give baselines.NAME.maps=DIR_OR_SAFETENSORS)")
    extra = sorted(set(cfg.baselines) - set(METHODS) - external)
    if extra:  # settings of registered methods left out of `methods` simply do not apply
        raise ConfigError(f"baselines has settings for {extra}, which are no registered method; registered: {sorted(METHODS)}")
    methods = {}
    for name in cfg.methods:
        settings = OmegaConf.to_container(cfg.m2ib) if name == "m2ib" else dict(cfg.baselines.get(name) or {})
        try:
            methods[name] = (ExternalMaps(backbone, name=name, **settings) if name in external
                             else make_method(name, backbone, **settings))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"baselines.{name}: {err}") from err
    return methods

# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class EvaluateData(RunData):  # a manifest's lines may carry a mask or boxes; WebDataset shards have no ground truth
    num_samples: int = 48
    batch_size: int = 16


@dataclass
class EvaluateExport:
    samples_per_shard: int = 1024
    shard_seconds: float = 300.0
    grid_samples: int = 8  # rows of the picture grid (image, then one map per method)


def _default_methods() -> List[str]:
    return ["m2ib", "saliency", "integrated_gradients", "grad_x_activation", "grad_cam", "rise", "rollout", "chefer", "random"]


@dataclass
class EvaluateConfig:
    task: str = "evaluate"
    seed: int = 0
    threads: Optional[int] = None  # intra-op threads per process; unset: the first run's (kept in run.json)
    output_dir: str = "runs/evaluate_shapes"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: EvaluateData = field(default_factory=EvaluateData)
    model: ModelConfig = field(default_factory=ModelConfig)
    m2ib: M2IBConfig = field(default_factory=M2IBConfig)
    methods: List[str] = field(default_factory=_default_methods)
    baselines: Dict[str, Any] = field(default_factory=dict)  # settings per method, e.g. {rise: {masks: 500}}
    metrics: MetricSettings = field(default_factory=MetricSettings)
    export: EvaluateExport = field(default_factory=EvaluateExport)
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateVQAData(EvaluateData):
    manifest: Optional[str] = None  # JSONL/CSV: id, image, question, answer (optional), mask or boxes (optional), class
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "what_colour", "what_shape", "what_size"])


@dataclass
class EvaluateVQAConfig(EvaluateConfig):
    task: str = "evaluate_vqa"
    output_dir: str = "runs/evaluate_shapes_vqa"
    data: EvaluateVQAData = field(default_factory=EvaluateVQAData)
    answers: AnswerSettings = field(default_factory=AnswerSettings)


#: this module's tasks and their schemas
SCHEMAS = {"evaluate": EvaluateConfig, "evaluate_vqa": EvaluateVQAConfig}


def run(cfg: DictConfig) -> dict[str, Any]:
    """A comparison of methods on pairs (``task: evaluate``) or on questions and their answers (``evaluate_vqa``)."""
    questions = cfg.task == "evaluate_vqa"
    backbone = backbone_of(cfg, "questions" if questions else "preprocessing")
    check_layers(cfg, backbone)
    methods = build_methods(cfg, backbone)
    source = source_of(cfg, questions=questions)
    out = Path(cfg.output_dir)
    display_image = getattr(backbone, "display_image", None)
    writer = EvaluationWriter(out, samples_per_shard=cfg.export.samples_per_shard, shard_seconds=cfg.export.shard_seconds,
                              grid_samples=cfg.export.grid_samples,
                              display_image=display_image)
    module = EvaluationModule(backbone, methods, metric_settings(cfg),
                              **({"max_new_tokens": cfg.answers.max_new_tokens} if questions else {}))
    if any(getattr(method, "has_text_map", False) for method in methods.values()):
        try:  # text metrics replace words: with an id that keeps the caption's pooled position, checked up front
            module.evaluator.replacement_id()
        except ValueError as err:
            raise ConfigError(f"metrics.replacement_id: {err}") from err

    def add_earlier_samples(trainer: L.Trainer, done: set[str]) -> None:
        if trainer.global_rank == 0:  # rank 0 alone: the sync sums them once
            earlier_samples(module, out)

    keys = RESULT_KEYS + (("answers", "data.kinds") if questions else ())
    owner = output_owner(cfg, keys, backbone.module, on_owned=(add_earlier_samples,), source=source)
    trainer = owned_trainer(cfg, owner, [writer], source, {"default_hp_metric": False})
    datamodule = PairDataModule(source, backbone, run_seed=cfg.seed, batch_size=cfg.data.batch_size,
                                num_workers=cfg.data.num_workers, skip_ids=lambda: owner.done, questions=questions)
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        if trainer.global_rank != 0:
            return {}
        return _finish(cfg, trainer, module.table, writer, owner.done_count)
    finally:
        owner.release()


def metric_settings(cfg: DictConfig) -> MetricSettings:
    """``cfg.metrics``, with the world's shapes as the classes of a world run that names none."""
    settings = OmegaConf.to_container(cfg.metrics)
    classes = settings.pop("classes")
    if classes is None and not (cfg.data.manifest or cfg.data.webdataset):
        classes = list(SHAPES)
    if classes is not None and (len(set(classes)) != len(classes) or not all(str(c).strip() for c in classes)):
        raise ConfigError(f"metrics.classes: must be distinct, non-empty names, got {classes}")
    return MetricSettings(**settings, classes=None if classes is None else [str(c) for c in classes])


def earlier_samples(module: EvaluationModule, out: Path) -> None:
    """Add the metric values and seconds of samples done by earlier runs into this run's metrics (a resumed table).

    Reads the per-sample scalars of the index, never the maps.
    """
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    classes: dict[str, list[int]] = defaultdict(list)  # per method: the class index of each pointing-game value
    seconds: dict[str, list[float]] = defaultdict(list)
    settings = module.evaluator.settings
    for entry in index_entries(out):
        label = entry.get("class")
        index = settings.class_index(label if label in (settings.classes or ()) else None)
        for method, metrics in entry["values"].items():
            if method in module.metrics:
                for name, value in metrics.items():
                    if value is not None:  # None: the metric does not apply to that sample
                        values[(method, name)].append(value)
                        if name == "pointing_game":
                            classes[method].append(index)
                seconds[method].append(entry["seconds"][method])
    for (method, name), scores in values.items():
        extra = {"classes": torch.tensor(classes[method])} if name == "pointing_game" else {}
        module.metrics[method][name].update_scores(torch.tensor(scores, dtype=torch.float64), **extra)
    for method, times in seconds.items():
        module.seconds[method].update(sum(times))
        module.samples[method].update(len(times))


def _cell(value: tuple[float | None, float | None] | None) -> str:
    """``mean ± SE``; ``NaN`` for a method whose scores were NaN, ``n/a`` for the error of a single sample."""
    if value is None:
        return "–"
    mean, error = ("NaN" if value[0] is None else f"{value[0]:.3f}"), ("n/a" if value[1] is None else f"{value[1]:.3f}")
    return f"{mean} ± {error}"


def tables(table: dict[str, dict[str, Any]]) -> tuple[str, str, list[str]]:
    """(results.md, results.csv, the metric columns used): metrics no method has are left out."""
    columns = [m for m in COLUMNS if any(row[m] is not None for row in table.values())]
    md = ["| method | " + " | ".join(f"{column_label(m)} {'↑' if higher_is_better(m) else '↓'}" for m in columns) + " | samples/s |",
          "|---" * (len(columns) + 2) + "|"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", *[f"{m}{suffix}" for m in columns for suffix in ("", "_se")], "samples", "samples_per_s"])
    for method, row in table.items():
        rate = "–" if row["samples_per_s"] is None else f"{row['samples_per_s']:.1f}"
        md.append(f"| {method} | " + " | ".join(_cell(row[m]) for m in columns) + f" | {rate} |")
        flat = ["" if v is None else v for m in columns for v in (row[m] if row[m] is not None else ("", ""))]
        writer.writerow([method, *flat, row["samples"], row["samples_per_s"] or ""])
    return "\n".join(md) + "\n", buffer.getvalue(), columns


def _finish(cfg: DictConfig, trainer: L.Trainer, table: dict, writer: EvaluationWriter, already: int) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    failures = merged_failures(out, writer.run_token)
    atomic_write(out / FAILURES_FILE, "".join(json.dumps(f) + "\n" for f in failures))
    md, csv_text, columns = tables(table)
    samples = max((row["samples"] for row in table.values()), default=0)
    data = cfg.data.manifest or cfg.data.webdataset or "the shapes world"
    what = "questions" if cfg.task == "evaluate_vqa" else "pairs"
    header = (f"{samples} {what} ({data}), "
              f"model {cfg.model.name_or_path}; mean ± standard error; ↑ higher is better, ↓ lower is better\n\n")
    atomic_write(out / "results.md", header + md)
    atomic_write(out / "results.csv", csv_text)
    experiment = trainer.logger.experiment
    experiment.add_text("results", header + md, 0)
    if writer.grid_images:
        grid = method_grid(writer.grid_images, writer.grid_maps, captions=writer.grid_captions)
        (out / "figures").mkdir(exist_ok=True)
        atomic_write(out / "figures" / "methods_grid.png", lambda tmp: grid.save(tmp, format="PNG"))
        experiment.add_image("methods_grid", np.asarray(grid), 0, dataformats="HWC")
    metrics = {f"{method}/{m}": row[m][0] for method, row in table.items() for m in columns if row[m] is not None and row[m][0] is not None}
    trainer.logger.log_hyperparams({"methods": ",".join(table), "model": cfg.model.name_or_path}, metrics=metrics)
    trainer.logger.finalize("success")
    summary = {
        "output_dir": str(out), "pairs": samples, "already_done": already,
        "failed": sum(f["severity"] == "error" for f in failures),
        "methods": {method: {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()} for method, row in table.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    print(f"\nattribution methods on {samples} {what}: {out}/results.md\n\n{header}{md}")
    return summary
