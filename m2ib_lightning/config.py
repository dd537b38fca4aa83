"""Typed run configurations: YAML files in configs/ plus ``key=value`` overrides, checked before any work.

Each task has a schema (dataclasses defined beside the task, in ``m2ib_lightning.tasks``); an unknown key or a
value of the wrong type fails with a message that names the key. ``trainer`` is passed to
``lightning.Trainer`` as it is, so every Trainer argument is available there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .backbones.loading import DTYPES
from .shapes.questions import QUESTION_KINDS
from .engine import M2IBConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def schemas() -> dict[str, type]:
    """Every task's schema, each defined beside its task (``m2ib_lightning.tasks``)."""
    from .tasks import schemas as task_schemas

    return task_schemas()




_ABSENT = object()  # an override not given at all; `key=null` is given, as None


#: the sites each probing task can patch
PROBE_SITES = {"probe": ("resid", "mlp", "self_attn", "self_head"),  # CLIP's; probe_vqa: BLIP VQA's, then the decoders'
               "probe_vqa": ("resid", "mlp", "self_attn", "cross_attn", "self_head", "cross_head", "attn", "head")}


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: v is None or v >= low), f">= {low}"


def _above(low: float) -> tuple[Any, str]:
    return (lambda v: v > low), f"> {low}"


def _one_of(*choices: str) -> tuple[Any, str]:
    return (lambda v: v in choices), f"one of {list(choices)}"


def _subset_of(*choices: str) -> tuple[Any, str]:
    return (lambda v: len(v) > 0 and set(v) <= set(choices)), f"a non-empty list of {list(choices)}"


#: Checked in every task that has the key, before any work; m2ib.* is checked by M2IBConfig itself.
VALUE_RULES: dict[str, tuple[Any, str]] = {
    "seed": _at_least(0),
    "world.seed": _at_least(0), "world.heldout_seed": _at_least(0), "world.image_size": _at_least(16),
    "world.max_objects": _at_least(1), "world.noise": _at_least(0),
    "data.num_samples": _at_least(1), "data.train_samples": _at_least(1), "data.val_samples": _at_least(1),
    "data.batch_size": _at_least(1), "data.num_workers": _at_least(0), "data.num_pairs": _at_least(1),
    "data.noise_std": _at_least(0), "data.attributes": _subset_of("colour", "shape", "position"),
    "data.corruption": _subset_of("image", "text", "noise"),
    "export.samples_per_shard": _at_least(1), "export.shard_seconds": _above(0), "export.overlays": _at_least(0), "export.tensorboard_every_n_batches": _at_least(1),
    "model.patch_size": _at_least(1), "model.width": _at_least(1), "model.layers": _at_least(1), "model.heads": _at_least(1),
    "model.projection_dim": _at_least(1), "model.vision_layers": _at_least(1), "model.text_layers": _at_least(1),
    "optim.lr": _above(0), "optim.weight_decay": _at_least(0), "optim.warmup_steps": _at_least(0),
    "probe.modalities": _subset_of("image", "text"),  # probe.towers: checked against the adapter when it loads
    "probe.direction": _one_of("denoise", "noise"), "probe.vision_positions": _one_of("all", "each"),
    "probe.batch_size": _at_least(1), "probe.min_gap": _at_least(0), "probe.top_heads": _at_least(0),
    "probe.head_ranking": _one_of("notice", "effect"),
    "metrics.steps": _at_least(1), "metrics.unit": _at_least(1), "metrics.top_k_fraction": (lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
    "metrics.deletion_baseline": _one_of("zero", "mean", "blur"), "metrics.insertion_baseline": _one_of("zero", "mean", "blur"),
    "export.grid_samples": _at_least(0),
    "data.held_out_fraction": (lambda v: 0 < v < 1, "in (0, 1)"), "data.shuffle_buffer": _at_least(1),
    "network.width": _at_least(1), "network.depth": _at_least(1), "network.heads": _at_least(1),
    "optim.rank_weight": _at_least(0), "optim.rank_sharpness": _above(0),
    "metrics.confidence_drop": _one_of("absolute", "relative"), "metrics.pointing_ties": _one_of("share", "any"),
    "metrics.pointing_tolerance": _at_least(0),
    "model.dtype": (lambda v: v is None or v in DTYPES, f"one of {list(DTYPES)}"),
    "answers.source": _one_of("given", "generate"), "answers.max_new_tokens": _at_least(1),
    "data.kinds": _subset_of(*QUESTION_KINDS),
    "threads": _at_least(1),
}


def _check_values(config: DictConfig) -> None:
    for key, (ok, expected) in VALUE_RULES.items():
        value = OmegaConf.select(config, key, default="__absent__")
        if isinstance(value, str) and value == "__absent__" or OmegaConf.is_missing(config, key):
            continue
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if not ok(value):
            raise ConfigError(f"bad config value {key}={value!r}: must be {expected}")


def _check_trainer_keys(config: DictConfig) -> None:
    """``trainer`` is free-form in the schema: check its keys against ``lightning.Trainer`` itself."""
    import inspect

    from lightning import Trainer

    accepted = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(config.trainer) - accepted)
    if unknown:
        raise ConfigError(f"bad config key 'trainer.{unknown[0]}': lightning.Trainer takes no argument {unknown[0]!r}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> DictConfig:
    """Schema defaults, then the YAML file, then ``key=value`` overrides; validated at each merge."""
    path = Path(path) if path else CONFIG_DIR / "default.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = OmegaConf.load(path)
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"cannot read the config: {err}") from err
    task = OmegaConf.select(dotlist, "task") or OmegaConf.select(data, "task") or "attribute"
    known = schemas()
    if task not in known:
        raise ConfigError(f"task={task!r} is unknown; choose from {sorted(known)}")
    config = OmegaConf.structured(known[task])
    OmegaConf.set_readonly(config, False)  # M2IBConfig is frozen; the merged result is rebuilt from it later
    for source, layer in ((str(path), data), ("the command line", dotlist)):
        try:
            config = OmegaConf.merge(config, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            raise ConfigError(f"bad config key {key!r} in {source}: {str(getattr(err, 'msg', err)).splitlines()[0]}") from err
    if "trainer" in config:
        _check_trainer_keys(config)
    _check_values(config)
    if task in PROBE_SITES:  # site aliases resolved once, here; an unknown site is a config error
        from .probing.patching import SITE_ALIASES

        sites = [SITE_ALIASES.get(site, site) if task == "probe" else site for site in config.probe.sites]
        unknown = [site for site in sites if site not in PROBE_SITES[task]]
        if unknown or (not sites and task == "probe"):  # probe_vqa: none named, every site of the adapter's towers
            raise ConfigError(f"bad config value probe.sites={list(config.probe.sites)!r}: must be a non-empty list of "
                              f"{list(PROBE_SITES[task])}" + (" (or 'head' for self_head)" if task == "probe" else ""))
        config.probe.sites = sites
    if "m2ib" in config:
        from .tasks.schema import RunM2IB

        try:
            (RunM2IB if "explainer" in config.m2ib else M2IBConfig)(**config.m2ib)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad config value in m2ib: {err}") from err
    # A merge keeps the schema default under a "???" of the file: ask the file itself what it leaves unset.
    missing = sorted(key for key in OmegaConf.missing_keys(data) if OmegaConf.select(dotlist, key, default=_ABSENT) is _ABSENT)
    if missing:
        raise ConfigError(f"config keys {missing} must be set (e.g. {missing[0]}=...)")
    return config


def describe_config(cfg: DictConfig, path: str | None) -> str:
    """``python train.py CONFIG.yaml [key=value ...] --help``: every key with the value this config (and its
    overrides) gives it, which the run would use."""
    lines = [f"python train.py {path or ''} (task={cfg.task}): the values this run would use; override any as key=value", ""]
    for key, value in _flatten(OmegaConf.to_container(cfg, resolve=True)):
        if key != "task":
            lines.append(f"  {key}={value}")
    return "\n".join(lines)


def describe_tasks() -> str:
    """``python train.py --help``: the tasks, each key with its default."""
    lines = [
        "usage: python train.py [CONFIG.yaml] [key=value ...]",
        "",
        "Runs the task a config names (task=...); without a config, configs/default.yaml (M2IB on the shapes world).",
        "Every key below can be set in the YAML file or overridden as key=value; `trainer` takes any lightning.Trainer argument.",
        f"Configs shipped: {', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))}",
        "python train.py --list prints the registered adapters, methods, metrics, probing adapters and sites.",
    ]
    for task, schema in schemas().items():
        lines += ["", f"task={task}:"]
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        for key, value in _flatten(defaults):
            if key != "task":
                lines.append(f"  {key}={value}")
    return "\n".join(lines)


def describe_registered() -> str:
    """``python train.py --list``: what each registry holds, so a config's names can be looked up."""
    from .backbones.loading import SHIPPED_MODELS
    from .backbones.registry import BACKBONES
    from .baselines import METHODS
    from .metrics import METRICS
    from .probing.adapters import PROBING_ADAPTERS

    rows = [
        ("backbone adapters (model.adapter; or auto, or package.module:Factory)", list(BACKBONES)),
        ("shipped models (model.name_or_path=builtin:NAME)",
         [name if (path / "config.json").exists() else f"{name} (not built here: python train.py {recipe})"
          for name, (path, recipe) in SHIPPED_MODELS.items()]),
        ("attribution methods (methods: [...], settings under baselines.NAME)", list(METHODS)),
        ("metrics (columns of an evaluation table)", list(METRICS)),
        ("backbone adapters with probe sites (the probing capability)",
         [name for name, factory in BACKBONES.items() if hasattr(factory, "probe_site")]),
        ("probing adapters registered for other models (tried first by ActivationPatching)", list(PROBING_ADAPTERS) or ["none"]),
        *((f"probe sites of task={task} (probe.sites)", list(sites)) for task, sites in PROBE_SITES.items()),
        ("tasks (task=...)", list(schemas())),
    ]
    return "\n".join(f"{title}:\n  {', '.join(names)}" for title, names in rows)


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
