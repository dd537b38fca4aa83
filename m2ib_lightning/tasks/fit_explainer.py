"""Train an amortised explainer with Lightning ``fit`` on the exports of an exact attribution run (of image-text
pairs, or of questions and their answers), and save it in hub layout with the backbone and exact-fit settings it
imitates."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ..data.explainer import ExplainerDataModule
from ..amortised.answers import new_answer_explainer
from ..amortised.explainer import new_explainer
from ..answers import answer_layers
from ..backbones import MODALITIES, resolve_layer
from ..config import ConfigError
from ..data.attribution import PairStream, QuestionStream
from ..modules.explainer import AnswerExplainerFit, ExplainerFit
from ..results import IDENTITY_FILE, atomic_write
from .common import backbone_of, make_trainer, prepare_output, source_of
from .schema import engine_config


# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class ExplainerData:
    batch_size: int = 64
    held_out_fraction: float = 0.05  # of the exact run's ids (by a hash of the id): the validation split
    shuffle_buffer: int = 2048  # examples shuffled within a window of this many (the data is streamed)
    num_workers: int = 0


@dataclass
class ExplainerShape:
    width: int = 64
    depth: int = 2
    heads: int = 4


@dataclass
class ExplainerOptim:
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    rank_weight: float = 1.0  # weight of the KL term (the order of the tokens) beside the squared error of log capacity
    rank_sharpness: float = 2.0  # the KL compares distributions proportional to capacity ** this: above 1, the peaks weigh more


@dataclass
class FitExplainerConfig:
    task: str = "fit_explainer"
    seed: int = 0
    output_dir: str = "runs/fit_explainer"
    exact_run: str = "runs/exact_shapes"  # the output_dir of an exact attribution run: its data, model and maps
    save_to: Optional[str] = None  # where the explainer is saved; default OUTPUT_DIR/explainer
    data: ExplainerData = field(default_factory=ExplainerData)
    network: ExplainerShape = field(default_factory=ExplainerShape)
    optim: ExplainerOptim = field(default_factory=ExplainerOptim)
    trainer: Dict[str, Any] = field(default_factory=dict)


#: this module's tasks and their schemas
SCHEMAS = {"fit_explainer": FitExplainerConfig}


#: the runs an explainer learns from
EXACT_TASKS = ("attribute", "attribute_vqa")


def exact_run_config(path: str | Path) -> DictConfig:
    """The config an exact attribution run was made with (saved in its output_dir), refused unless it is one."""
    path = Path(path)
    saved, identity = path / "config.yaml", path / IDENTITY_FILE
    if not saved.is_file() or not identity.is_file():
        raise ConfigError(f"exact_run={str(path)!r} holds no attribution run (no config.yaml and {IDENTITY_FILE}): "
                          "run `python train.py output_dir=DIR ...` first and pass that DIR")
    task = json.loads(identity.read_text())["task"]
    if task not in EXACT_TASKS:
        raise ConfigError(f"exact_run={str(path)!r} holds a {task!r} run; an explainer learns from an `attribute` run "
                          "(image-text pairs) or an `attribute_vqa` run (questions and their answers)")
    run_cfg = OmegaConf.load(saved)
    if run_cfg.m2ib.get("explainer", "exact") != "exact":
        raise ConfigError(f"exact_run={str(path)!r} was itself made by an explainer (m2ib.explainer="
                          f"{run_cfg.m2ib.explainer!r}): learn from exact fits")
    return run_cfg


def example_answer_batch(source: Any, backbone: Any) -> Any:
    """One question of the source as an answer batch: what the explainer's widths are read from (any answer
    token will do: the widths do not depend on it)."""
    item = next(i for i in QuestionStream(source, backbone, 0) if "failure" not in i)
    joined = backbone.join_inputs([item["image_inputs"]])
    ids = torch.tensor([item["input_ids"]])
    answer = torch.tensor([item.get("answer_ids") or item["input_ids"][-1:]])
    return backbone.answer_batch(joined.pop("pixel_values"), ids, torch.ones_like(ids), answer, torch.ones_like(answer), **joined)


def run(cfg: DictConfig) -> Path | None:
    """Fit on the exact run's train split, validate on its held-out ids, and save the explainer."""
    L.seed_everything(cfg.seed, workers=True)
    run_cfg = exact_run_config(cfg.exact_run)
    questions = run_cfg.task == "attribute_vqa"
    backbone = backbone_of(run_cfg, "questions" if questions else "preprocessing")
    source = source_of(run_cfg, questions=questions)
    m2ib = engine_config(run_cfg.m2ib)
    name = str(run_cfg.model.name_or_path)
    if questions:
        layers = answer_layers(backbone, m2ib)
        network = new_answer_explainer(backbone, m2ib, example_answer_batch(source, backbone), name=name, seed=cfg.seed,
                                       **cfg.network)
        module = AnswerExplainerFit(backbone, network, layers, **cfg.optim)
    else:
        layers = {m: resolve_layer(m2ib.layer(m), backbone.num_layers(m), m) for m in MODALITIES}
        example = next(i for i in PairStream(source, backbone, 0) if "failure" not in i)  # one pair: the towers' widths
        network = new_explainer(backbone, m2ib, example["pixel_values"][None], torch.tensor([example["input_ids"]]),
                                name=name, seed=cfg.seed, **cfg.network)
        module = ExplainerFit(backbone, network, layers, **cfg.optim)
    out = prepare_output(cfg)
    datamodule = ExplainerDataModule(cfg.exact_run, source, backbone, out / "targets.sqlite", batch_size=cfg.data.batch_size,
                                     held_out_fraction=cfg.data.held_out_fraction, shuffle_buffer=cfg.data.shuffle_buffer,
                                     num_workers=cfg.data.num_workers, seed=cfg.seed, questions=questions)
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)  # the frozen backbone

    trainer = make_trainer(cfg, default_root_dir=str(out), logger=TensorBoardLogger(str(out), name="tensorboard"),
                           callbacks=[ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True)])
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    metrics = {k: round(float(v), 4) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    if trainer.global_rank != 0:
        return None
    save_to = Path(cfg.save_to) if cfg.save_to else out / "explainer"
    network.config.training = {"exact_run": str(cfg.exact_run), "steps": trainer.global_step, "wall_time_s": round(wall, 1),
                               "optim": OmegaConf.to_container(cfg.optim), "held_out": metrics}
    network.save_pretrained(save_to)
    summary = {"steps": trainer.global_step, "wall_time_s": round(wall, 1), **metrics, "explainer_dir": str(save_to),
               "config": OmegaConf.to_container(cfg)}
    atomic_write(out / "fit_summary.json", json.dumps(summary, indent=2))
    print(f"saved the explainer to {save_to}: held-out median Spearman rho image "
          f"{metrics.get('val/image_spearman_median', float('nan')):.3f}, text {metrics.get('val/text_spearman_median', float('nan')):.3f} "
          f"after {trainer.global_step} steps, {wall / 60:.1f} min")
    return save_to

