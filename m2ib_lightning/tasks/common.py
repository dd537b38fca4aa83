"""What every run of ``train.py`` starts with."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from ..backbones import MODALITIES, HubOptions, UnknownAdapterError, load_backbone, resolve_layer
from ..backbones.capabilities import MissingCapabilityError, require
from ..config import ConfigError
from ..shapes.world import ShapesWorld
from ..results import run_identity


def world_of(cfg: DictConfig, seed: int | None = None) -> ShapesWorld:
    """The shapes world a config describes; the held-out one unless ``seed`` says otherwise."""
    seed = cfg.world.heldout_seed if seed is None else seed
    return ShapesWorld(seed=seed, image_size=cfg.world.image_size, max_objects=cfg.world.max_objects, noise=cfg.world.noise)


def source_of(cfg: DictConfig, questions: bool = False):
    """The pairs (or, with ``questions``, the questions) a run's config names: WebDataset shards, a manifest, or the
    held-out shapes world."""
    from ..data.attribution import QuestionWorldSource, WorldSource
    from ..data.manifest import ManifestSource

    webdataset = cfg.data.get("webdataset")
    if cfg.data.manifest and webdataset:
        raise ConfigError("data.manifest and data.webdataset are both set: choose one source")
    try:
        if webdataset:
            from ..data.webdataset import WebDatasetSource

            return WebDatasetSource(webdataset, bare_keys=cfg.data.get("webdataset_bare_keys", False), questions=questions)
        if cfg.data.manifest:
            return ManifestSource(cfg.data.manifest, root=cfg.data.get("root"), questions=questions)
    except (OSError, ValueError) as err:
        key = "data.webdataset" if webdataset else "data.root" if "data.root" in str(err) else "data.manifest"
        raise ConfigError(f"{key}: {err}") from err
    if questions:
        from ..shapes.questions import ShapesVQA

        vqa = ShapesVQA(world_of(cfg), tuple(cfg.data.kinds))
        return QuestionWorldSource(vqa, cfg.data.num_samples, own_answers=cfg.answers.source == "generate")
    return WorldSource(world_of(cfg), cfg.data.num_samples)


def prepare_output(cfg: DictConfig) -> Path:
    """Create ``output_dir`` (writable); its config is saved by the run's owner, or a fit's summary."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir={str(out)!r} cannot be created: {err.strerror}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={str(out)!r} is not writable")
    return out


def hub_options(cfg: DictConfig) -> HubOptions | None:
    """The ``from_pretrained`` settings of ``model``; None when all are at their defaults."""
    keys = ("revision", "dtype", "attn_implementation", "local_files_only", "trust_remote_code")
    options = HubOptions(**{key: cfg.model.get(key, getattr(HubOptions, key)) for key in keys})
    return None if options == HubOptions() else options


def backbone_of(cfg: DictConfig, capability: str = "preprocessing"):
    """The adapter ``model.name_or_path`` / ``model.adapter`` name, loaded with its processor (see :func:`loading`),
    with the ``capability`` the run needs (``questions`` for a VQA run)."""
    with loading(cfg):
        backbone = load_backbone(cfg.model.name_or_path, cfg.model.adapter, hub=hub_options(cfg))
        require(backbone, capability, f"a train.py {cfg.task} run")
        return backbone


@contextlib.contextmanager
def loading(cfg: DictConfig) -> Iterator[None]:
    """Whatever keeps ``model`` from loading is a ConfigError of one line naming the key."""
    try:
        yield
    except (UnknownAdapterError, MissingCapabilityError) as err:
        raise ConfigError(f"model.adapter={cfg.model.adapter!r}: {err}") from err
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: {one_line(err)}") from err


def one_line(err: BaseException) -> str:
    """An exception's message on one line (transformers' loading errors span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def check_layers(cfg: DictConfig, backbone) -> None:
    """``m2ib.vision_layer`` / ``m2ib.text_layer`` within the loaded model's towers, before any work."""
    for modality in MODALITIES:
        key = "vision_layer" if modality == "image" else "text_layer"
        try:
            if hasattr(backbone, "resolve_layer"):  # an answer adapter: it knows where a bottleneck cannot go
                backbone.resolve_layer(modality, cfg.m2ib[key], f"m2ib.{key}")
            else:
                resolve_layer(cfg.m2ib[key], backbone.num_layers(modality), f"m2ib.{key}",
                              f"the {modality} tower of {cfg.model.name_or_path}")
        except ValueError as err:
            raise ConfigError(str(err)) from err


def output_owner(cfg: DictConfig, result_keys: tuple[str, ...], model=None, on_owned: tuple = (), source=None):
    """The :class:`~m2ib_lightning.callbacks.OutputOwner` of a run: its identity is the task, the settings
    ``result_keys`` name, and the loaded model's revision (a hub commit, where there is one)."""
    from ..callbacks import OutputOwner

    values = {key: OmegaConf.select(cfg, key) for key in result_keys}  # dotted keys name one setting of a group
    settings = {key: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for key, v in values.items()}
    identity = run_identity(cfg.task, settings, getattr(getattr(model, "config", None), "_commit_hash", None))
    share = None
    if source is not None and hasattr(source, "rank_share"):  # the done ids a rank's readers can meet, no more
        workers = max(1, int(cfg.data.get("num_workers", 0)))
        share = lambda rank, world: source.rank_share(rank, world, workers)  # noqa: E731
    return OutputOwner(cfg.output_dir, identity, OmegaConf.to_yaml(cfg), threads=cfg.get("threads"), on_owned=on_owned,
                       share=share)


def make_trainer(cfg: DictConfig, **kwargs):
    """``lightning.Trainer(**kwargs, **cfg.trainer)``; settings Lightning refuses are a ConfigError naming them.

    Made before ``output_dir`` is: a refused setting leaves nothing behind.
    """
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    trainer_args = OmegaConf.to_container(cfg.trainer)
    try:
        return L.Trainer(**kwargs, **trainer_args)
    except (TypeError, ValueError, MisconfigurationException) as err:
        given = ", ".join(f"trainer.{key}={value!r}" for key, value in trainer_args.items()) or "trainer defaults"
        raise ConfigError(f"bad config value in trainer ({given}): {err}") from err


def owned_trainer(cfg: DictConfig, owner, callbacks: list, source=None, logger_args: dict | None = None):
    """The Trainer of a predict run, then ``output_dir``, then the owner's claim on it (see OutputOwner.claim).

    ``owner`` comes first among the callbacks; TensorBoard in OUTPUT_DIR/tensorboard (``logger_args`` for
    its options); for a streamed ``source``, the run's progress over all ranks (:class:`RunProgress`, of what is
    left once the owner knows what is done) and a progress bar in samples unless ``trainer`` turns it off; last,
    :class:`StopOnSigterm` (a preempted run stops after the batch the writers have taken).
    """
    import warnings

    from lightning.pytorch.loggers import TensorBoardLogger

    from ..callbacks import RunProgress, SampleProgressBar, StopOnSigterm

    callbacks = [owner, *callbacks]
    if source is not None:
        total = source.size_hint()
        callbacks.insert(1, RunProgress(cfg.output_dir, None if total is None else lambda: max(total - owner.done_count, 0)))
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(SampleProgressBar())
    callbacks.append(StopOnSigterm())
    # A streamed dataset has no sampler whose indices a prediction writer could get: the writers do not need them.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices", category=UserWarning)
    logger = TensorBoardLogger(cfg.output_dir, name="tensorboard", version="", **(logger_args or {}))
    trainer = make_trainer(cfg, inference_mode=False, logger=logger, callbacks=callbacks)
    prepare_output(cfg)  # the owner saves the config once it holds the output
    owner.claim(trainer)
    return trainer


def fit_and_save(cfg: DictConfig, out: Path, module, train_loader, val_loader, processor) -> tuple[Path, int, dict, float] | None:
    """Lightning ``fit`` with checkpoints and TensorBoard, a last validation, then ``save_pretrained`` of
    ``module.model`` and ``processor`` (and its image processor alone, for transformers 4.x) into ``cfg.save_to``.

    Returns (where it was saved, steps, the last validation's metrics (synced over ranks), seconds of
    fitting) on global rank 0, which alone saves; None on the other ranks.
    """
    import time

    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = make_trainer(
        cfg,
        default_root_dir=str(out),
        logger=TensorBoardLogger(str(out), name="tensorboard"),
        callbacks=[ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True),
                   LearningRateMonitor(logging_interval="step")],
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - start
    metrics = trainer.validate(module, val_loader, verbose=False)[0]
    if trainer.global_rank != 0:
        return None
    save_to = Path(cfg.save_to) if cfg.save_to else out / "model"
    module.model.save_pretrained(save_to)
    processor.save_pretrained(save_to)
    processor.image_processor.save_pretrained(save_to)
    return save_to, trainer.global_step, metrics, wall


def write_fit_summary(cfg: DictConfig, out: Path, fitted: tuple[Path, int, dict, float], results: dict) -> dict:
    """``fit_summary.json`` of a fit (rank 0): steps, seconds, the task's held-out ``results``, where it saved, the config."""
    import json

    from ..results import atomic_write

    save_to, steps, _, wall = fitted
    summary = {"steps": steps, "wall_time_s": round(wall, 1), **results, "model_dir": str(save_to),
               "config": OmegaConf.to_container(cfg)}
    atomic_write(out / "fit_summary.json", json.dumps(summary, indent=2))
    return summary

