"""The parts of the tasks' schemas they share: the world, the model to load, the export, the fits' data and
optimiser, the answers of VQA runs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from ..engine import M2IBConfig


@dataclass
class WorldConfig:
    seed: int = 0
    heldout_seed: int = 1  # the world of validation, attribution and evaluation samples
    image_size: int = 64
    max_objects: int = 3
    noise: float = 0.03


@dataclass
class RunData:
    """Where a predict run's samples come from: a manifest, WebDataset shards, or the held-out shapes world."""

    manifest: Optional[str] = None  # JSONL/CSV (id, image, text), COCO captions JSON, or a folder with captions.txt
    webdataset: Optional[str] = None  # tar shards as img2dataset writes them, e.g. /data/{00000..00999}.tar
    webdataset_bare_keys: bool = False  # sample id = the key alone (unique across shards), not SHARD/KEY
    root: Optional[str] = None  # manifest image and mask paths must lie inside it; unset: the manifest's folder
    num_samples: int = 64  # without manifest or webdataset: this many held-out pairs of the shapes world
    batch_size: int = 8
    num_workers: int = 0


@dataclass
class FitData:
    train_samples: int = 300_000
    val_samples: int = 512
    batch_size: int = 128
    num_workers: int = 0


@dataclass
class FitOptim:
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100


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
    tensorboard_every_n_batches: int = 20  # TensorBoard overlays every N batches (drawing one costs ~0.15 s)


@dataclass
class AnswerSettings:
    source: str = "given"  # given: the data's answers (the world's; a manifest's where it has one, else generate); generate: the model's own
    max_new_tokens: int = 16  # the longest greedy answer


@dataclass
class FitVQAData(FitData):
    # the training mix, kind i of sample j = kinds[j % len(kinds)]: repeat a kind to weigh it more
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "side", "place", "what_colour", "what_shape", "what_size"])


@dataclass(frozen=True)
class RunM2IB(M2IBConfig):
    """The engine's settings, plus where an attribution run's maps come from."""

    explainer: str = "exact"  # exact: fit every sample; a directory or builtin:NAME: an amortised explainer predicts them
    audit_every: int = 0  # with an explainer: every N-th sample (by a hash of its id) is also fitted exactly and compared

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.audit_every, bool) or not isinstance(self.audit_every, int) or self.audit_every < 0:
            raise ValueError(f"audit_every must be an int >= 0, got {self.audit_every!r}")
        if not self.explainer:
            raise ValueError("explainer must be 'exact', a directory or builtin:NAME, got an empty string")
        if self.audit_every and self.explainer == "exact":
            raise ValueError("audit_every compares an amortised explainer with the exact fit: set explainer too")


def engine_config(m2ib: Any) -> M2IBConfig:
    """The engine's own settings out of a config's ``m2ib`` group (which may hold a run's settings besides)."""
    return M2IBConfig(**{f.name: m2ib[f.name] for f in fields(M2IBConfig) if f.name in m2ib})
