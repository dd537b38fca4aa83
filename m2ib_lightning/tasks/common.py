"""What every run of ``train.py`` starts with."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..backbones import MODALITIES, UnknownAdapterError, load_backbone, resolve_layer
from ..config import ConfigError
from ..data.world import ShapesWorld
from ..results import atomic_write, run_identity


def world_of(cfg: DictConfig, seed: int | None = None) -> ShapesWorld:
    """The shapes world a config describes; the held-out one unless ``seed`` says otherwise."""
    seed = cfg.world.heldout_seed if seed is None else seed
    return ShapesWorld(seed=seed, image_size=cfg.world.image_size, max_objects=cfg.world.max_objects, noise=cfg.world.noise)


def source_of(cfg: DictConfig):
    """The pairs a run's config names: WebDataset shards, a manifest, or the held-out shapes world."""
    from ..data.attribution import WorldSource
    from ..data.manifest import ManifestSource

    webdataset = cfg.data.get("webdataset")
    if cfg.data.manifest and webdataset:
        raise ConfigError("data.manifest and data.webdataset are both set: choose one source")
    try:
        if webdataset:
            from ..data.webdataset import WebDatasetSource

            return WebDatasetSource(webdataset)
        if cfg.data.manifest:
            return ManifestSource(cfg.data.manifest)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{'data.webdataset' if webdataset else 'data.manifest'}: {err}") from err
    return WorldSource(world_of(cfg), cfg.data.num_samples)


def prepare_output(cfg: DictConfig, save_config: bool = True) -> Path:
    """Create ``output_dir`` and save the resolved config in it."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir={str(out)!r} cannot be created: {err.strerror}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={str(out)!r} is not writable")
    if save_config:
        atomic_write(out / "config.yaml", OmegaConf.to_yaml(cfg))
    return out


def backbone_of(cfg: DictConfig):
    """The adapter ``model.name_or_path`` / ``model.adapter`` name, loaded with its processor; a bad name is a ConfigError."""
    try:
        return load_backbone(cfg.model.name_or_path, cfg.model.adapter)
    except UnknownAdapterError as err:
        raise ConfigError(f"model.adapter={cfg.model.adapter!r}: {err}") from err


def check_layers(cfg: DictConfig, backbone) -> None:
    """``m2ib.vision_layer`` / ``m2ib.text_layer`` within the loaded model's towers, before any work."""
    for modality in MODALITIES:
        key = "vision_layer" if modality == "image" else "text_layer"
        try:
            resolve_layer(cfg.m2ib[key], backbone.num_layers(modality), f"m2ib.{key}", f"the {modality} tower of {cfg.model.name_or_path}")
        except ValueError as err:
            raise ConfigError(str(err)) from err


def output_owner(cfg: DictConfig, result_keys: tuple[str, ...], backbone=None, on_owned: tuple = ()):
    """The :class:`~m2ib_lightning.callbacks.OutputOwner` of a run: its identity is the task, the settings
    ``result_keys`` name, and the loaded model's revision (a hub commit, where there is one)."""
    from ..callbacks import OutputOwner

    settings = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
                for key in result_keys}
    model_config = getattr(getattr(backbone, "module", None), "config", None)
    identity = run_identity(cfg.task, settings, getattr(model_config, "_commit_hash", None))
    return OutputOwner(cfg.output_dir, identity, OmegaConf.to_yaml(cfg), threads=cfg.get("threads"), on_owned=on_owned)


def streaming_trainer(cfg: DictConfig, out: Path, owner, callbacks: list, source):
    """The Trainer of a predict run over a streamed source: ``owner`` first among the callbacks, TensorBoard in
    OUTPUT_DIR/tensorboard (hparams logged at the end with the final metrics), and a progress bar in samples
    (of what is left once the owner knows what is done) unless ``trainer`` turns it off."""
    import warnings

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..callbacks import SampleProgressBar

    trainer_args = OmegaConf.to_container(cfg.trainer)
    callbacks = [owner, *callbacks]
    if trainer_args.get("enable_progress_bar", True):
        total = source.size_hint()
        callbacks.append(SampleProgressBar(None if total is None else lambda: max(total - len(owner.done), 0)))
    # A streamed dataset has no sampler whose indices a prediction writer could get: the writers do not need them.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices", category=UserWarning)
    logger = TensorBoardLogger(str(out), name="tensorboard", version="", default_hp_metric=False)
    trainer = L.Trainer(inference_mode=False, logger=logger, callbacks=callbacks, **trainer_args)
    owner.claim(trainer)
    return trainer


def fit_and_save(cfg: DictConfig, out: Path, module, train_loader, val_loader, processor) -> tuple[Path, int, dict, float]:
    """Lightning ``fit`` with checkpoints and TensorBoard, a last validation, then ``save_pretrained`` of
    ``module.model`` and ``processor`` (and its image processor alone, for transformers 4.x) into ``cfg.save_to``.

    Returns (where it was saved, steps, the last validation's metrics, seconds of fitting).
    """
    import time

    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = L.Trainer(
        default_root_dir=str(out),
        logger=TensorBoardLogger(str(out), name="tensorboard"),
        callbacks=[ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True),
                   LearningRateMonitor(logging_interval="step")],
        **OmegaConf.to_container(cfg.trainer),
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - start
    metrics = trainer.validate(module, val_loader, verbose=False)[0]
    save_to = Path(cfg.save_to) if cfg.save_to else out / "model"
    module.model.save_pretrained(save_to)
    processor.save_pretrained(save_to)
    processor.image_processor.save_pretrained(save_to)
    return save_to, trainer.global_step, metrics, wall
