"""Typed run configurations: YAML files in configs/ plus ``key=value`` overrides, checked before any work.

Each task has a schema (dataclasses below); an unknown key or a value of the
wrong type fails with a message that names the key. ``trainer`` is passed to
``lightning.Trainer`` as it is, so every Trainer argument is available there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .backbones.loading import DTYPES
from .shapes.questions import QUESTION_KINDS
from .engine import M2IBConfig
from .metrics.settings import MetricSettings

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class WorldConfig:
    seed: int = 0
    heldout_seed: int = 1  # the world of validation, attribution and evaluation samples
    image_size: int = 64
    max_objects: int = 3
    noise: float = 0.03


@dataclass
class FitData:
    train_samples: int = 300_000
    val_samples: int = 512
    batch_size: int = 128
    num_workers: int = 0


@dataclass
class FitModel:
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    projection_dim: int = 128


@dataclass
class FitOptim:
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100


@dataclass
class FitClipConfig:
    task: str = "fit_clip"
    seed: int = 0
    output_dir: str = "runs/fit_shapes_clip"
    save_to: Optional[str] = None  # where save_pretrained writes the model; default OUTPUT_DIR/model
    world: WorldConfig = field(default_factory=WorldConfig)
    data: FitData = field(default_factory=FitData)
    model: FitModel = field(default_factory=FitModel)
    optim: FitOptim = field(default_factory=FitOptim)
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FitVQAModel:
    patch_size: int = 8
    width: int = 128
    vision_layers: int = 4
    text_layers: int = 4
    heads: int = 4


@dataclass
class FitVQAData(FitData):
    # the training mix, kind i of sample j = kinds[j % len(kinds)]: repeat a kind to weigh it more
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "side", "place", "what_colour", "what_shape", "what_size"])


@dataclass
class FitVQAConfig:
    task: str = "fit_vqa"
    seed: int = 0
    output_dir: str = "runs/fit_shapes_vqa"
    save_to: Optional[str] = None  # where save_pretrained writes the model; default OUTPUT_DIR/model
    init_vision_from: Optional[str] = "builtin:shapes-clip"  # a CLIP whose vision tower starts the BLIP one
    world: WorldConfig = field(default_factory=WorldConfig)
    data: FitVQAData = field(default_factory=FitVQAData)
    model: FitVQAModel = field(default_factory=FitVQAModel)
    optim: FitOptim = field(default_factory=FitOptim)
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FitLlavaModel:
    width: int = 128  # the Llama's hidden size
    layers: int = 4
    heads: int = 4
    vision_feature_layer: int = -2  # the vision block whose output the language model reads (LLaVA-1.5: -2)
    freeze_vision: bool = False  # keep the vision tower as vision_from has it (LLaVA-1.5 does); trains 1.4x faster
    vision_lr_scale: float = 1.0  # the vision tower's learning rate relative to optim.lr, when it trains


@dataclass
class FitLlavaConfig:
    task: str = "fit_llava"
    seed: int = 0
    output_dir: str = "runs/fit_shapes_llava"
    save_to: Optional[str] = None  # where save_pretrained writes the model; default OUTPUT_DIR/model
    vision_from: str = "builtin:shapes-clip"  # the CLIP whose vision tower becomes the LLaVA's
    world: WorldConfig = field(default_factory=WorldConfig)
    data: FitVQAData = field(default_factory=FitVQAData)
    model: FitLlavaModel = field(default_factory=FitLlavaModel)
    optim: FitOptim = field(default_factory=FitOptim)
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AttributeData:
    manifest: Optional[str] = None  # JSONL/CSV (id, image, text), COCO captions JSON, or a folder with captions.txt
    webdataset: Optional[str] = None  # tar shards as img2dataset writes them, e.g. /data/{00000..00999}.tar
    webdataset_bare_keys: bool = False  # sample id = the key alone (unique across shards), not SHARD/KEY
    root: Optional[str] = None  # manifest image and mask paths must lie inside it; unset: the manifest's folder
    num_samples: int = 64  # without manifest or webdataset: this many held-out pairs of the shapes world
    batch_size: int = 8
    num_workers: int = 0


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:shapes-clip"  # hub name, local directory (hub layout) or builtin:NAME
    adapter: str = "auto"  # auto (from config.json's model_type), a registered name, or package.module:Factory
    revision: Optional[str] = None  # hub branch, tag or commit to pin
    dtype: Optional[str] = None  # weights' dtype: float32, bfloat16, float16, auto; unset: the checkpoint's default
    attn_implementation: Optional[str] = None  # eager, sdpa, ...; unset: transformers' choice
    local_files_only: bool = False  # never ask the hub (a cluster node without network)
    trust_remote_code: bool = False  # run the checkpoint's own Python code: only for checkpoints you trust


@dataclass
class ExportConfig:
    samples_per_shard: int = 1024  # each rank closes a shard file every this many samples
    shard_seconds: float = 300.0  # ... or once its first sample is this old: a kill loses minutes of work, not hours
    overlays: Optional[int] = None  # PNG overlays of the first N samples per rank; default 64 for the world, 0 otherwise
    tensorboard_every_n_batches: int = 2


@dataclass
class AttributeConfig:
    task: str = "attribute"
    seed: int = 0
    threads: Optional[int] = None  # intra-op threads per process; unset: the first run's (kept in run.json)
    output_dir: str = "runs/default"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: AttributeData = field(default_factory=AttributeData)
    model: ModelConfig = field(default_factory=ModelConfig)
    m2ib: M2IBConfig = field(default_factory=M2IBConfig)  # the engine's own settings
    export: ExportConfig = field(default_factory=ExportConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AttributeVQAData(AttributeData):
    manifest: Optional[str] = None  # JSONL/CSV: id, image, question, answer (optional), mask or boxes (optional), class
    num_samples: int = 64  # without a manifest: this many held-out questions of the shapes world (each names an object)
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "what_colour", "what_shape", "what_size"])


@dataclass
class AnswerSettings:
    source: str = "given"  # given: the data's answers (the world's; a manifest's where it has one, else generate); generate: the model's own
    max_new_tokens: int = 16  # the longest greedy answer


@dataclass
class AttributeVQAConfig(AttributeConfig):
    task: str = "attribute_vqa"
    output_dir: str = "runs/attribute_shapes_vqa"
    data: AttributeVQAData = field(default_factory=AttributeVQAData)
    answers: AnswerSettings = field(default_factory=AnswerSettings)


@dataclass
class ProbeData:
    num_pairs: int = 12  # minimal pairs of the held-out world, cycling through the attributes
    attributes: List[str] = field(default_factory=lambda: ["colour", "shape", "position"])


@dataclass
class ProbeSettings:
    modalities: List[str] = field(default_factory=lambda: ["image", "text"])  # which side is corrupted
    sites: List[str] = field(default_factory=lambda: ["resid", "mlp", "self_head"])  # also self_attn; "head" = self_head
    direction: str = "denoise"
    batch_size: int = 256
    min_gap: float = 1e-3


@dataclass
class ProbeConfig:
    task: str = "probe"
    seed: int = 0
    output_dir: str = "runs/probe_shapes"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: ProbeData = field(default_factory=ProbeData)
    model: ModelConfig = field(default_factory=ModelConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)


@dataclass
class ProbeVQAData:
    num_pairs: int = 24  # minimal pairs of the held-out world, cycling through the kinds
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "side"])
    manifest: Optional[str] = None  # JSONL: id, clean_image, corrupt_image, question, answer, wrong_answer
    corruption: List[str] = field(default_factory=lambda: ["image", "text"])  # image (SMP), text (STR), noise (baseline)
    noise_std: float = 0.5  # Gaussian-noise baseline, in normalised pixel units


@dataclass
class ProbeVQASettings:
    towers: List[str] = field(default_factory=lambda: ["text", "vision"])
    sites: List[str] = field(default_factory=lambda: ["resid", "mlp", "self_attn", "cross_attn", "self_head", "cross_head"])
    direction: str = "denoise"
    vision_positions: str = "all"  # image tokens one at a time (each: one forward of the whole model per token) or all
    batch_size: int = 256
    min_gap: float = 1e-3
    top_heads: int = 3  # cross-attention heads drawn over the image
    head_ranking: str = "notice"  # notice: P(answer) with one head patched at the answer token | effect: |effect|, all positions


@dataclass
class ProbeVQAConfig:
    task: str = "probe_vqa"
    seed: int = 0
    threads: Optional[int] = None  # intra-op threads per process; unset: the first run's (kept in run.json)
    output_dir: str = "runs/probe_shapes_vqa"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: ProbeVQAData = field(default_factory=ProbeVQAData)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="builtin:shapes-blip-vqa"))
    probe: ProbeVQASettings = field(default_factory=ProbeVQASettings)
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateData:
    manifest: Optional[str] = None  # pairs (id, image, text; optional mask or boxes); unset: held-out pairs of the world
    webdataset: Optional[str] = None  # tar shards as img2dataset writes them (no ground truth)
    webdataset_bare_keys: bool = False  # sample id = the key alone (unique across shards), not SHARD/KEY
    root: Optional[str] = None  # manifest image and mask paths must lie inside it; unset: the manifest's folder
    num_samples: int = 48  # without manifest or webdataset: this many held-out pairs of the shapes world
    batch_size: int = 16
    num_workers: int = 0


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


def _answer_methods() -> List[str]:
    return ["m2ib", "saliency", "integrated_gradients", "grad_x_activation", "grad_cam", "rise", "random"]


@dataclass
class EvaluateVQAData(EvaluateData):
    manifest: Optional[str] = None  # JSONL/CSV: id, image, question, answer (optional), mask or boxes (optional), class
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "what_colour", "what_shape", "what_size"])


@dataclass
class EvaluateVQAConfig(EvaluateConfig):
    task: str = "evaluate_vqa"
    output_dir: str = "runs/evaluate_shapes_vqa"
    data: EvaluateVQAData = field(default_factory=EvaluateVQAData)
    methods: List[str] = field(default_factory=_answer_methods)  # rollout and chefer need attention, which answer adapters do not offer
    answers: AnswerSettings = field(default_factory=AnswerSettings)


SCHEMAS = {"attribute": AttributeConfig, "attribute_vqa": AttributeVQAConfig, "fit_clip": FitClipConfig, "fit_vqa": FitVQAConfig, "fit_llava": FitLlavaConfig, "probe": ProbeConfig, "probe_vqa": ProbeVQAConfig, "evaluate": EvaluateConfig, "evaluate_vqa": EvaluateVQAConfig}


_ABSENT = object()  # an override not given at all; `key=null` is given, as None


#: the sites each probing task can patch
PROBE_SITES = {"probe": ("resid", "mlp", "self_attn", "self_head"),
               "probe_vqa": ("resid", "mlp", "self_attn", "cross_attn", "self_head", "cross_head")}


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
    "probe.modalities": _subset_of("image", "text"), "probe.towers": _subset_of("text", "vision"),
    "probe.direction": _one_of("denoise", "noise"), "probe.vision_positions": _one_of("all", "each"),
    "probe.batch_size": _at_least(1), "probe.min_gap": _at_least(0), "probe.top_heads": _at_least(0),
    "probe.head_ranking": _one_of("notice", "effect"),
    "metrics.steps": _at_least(1), "metrics.unit": _at_least(1), "metrics.top_k_fraction": (lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
    "metrics.deletion_baseline": _one_of("zero", "mean", "blur"), "metrics.insertion_baseline": _one_of("zero", "mean", "blur"),
    "export.grid_samples": _at_least(0),
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
    if task not in SCHEMAS:
        raise ConfigError(f"task={task!r} is unknown; choose from {sorted(SCHEMAS)}")
    config = OmegaConf.structured(SCHEMAS[task])
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
        if unknown or not sites:
            raise ConfigError(f"bad config value probe.sites={list(config.probe.sites)!r}: must be a non-empty list of "
                              f"{list(PROBE_SITES[task])}" + (" (or 'head' for self_head)" if task == "probe" else ""))
        config.probe.sites = sites
    if "m2ib" in config:
        try:
            M2IBConfig(**config.m2ib)
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
    for task, schema in SCHEMAS.items():
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
        ("tasks (task=...)", list(SCHEMAS)),
    ]
    return "\n".join(f"{title}:\n  {', '.join(names)}" for title, names in rows)


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
