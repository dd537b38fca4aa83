"""The on-disk layout of an attribution run, and reading it back.

``OUTPUT_DIR/shards/*.safetensors`` hold the maps of one batch each;
``OUTPUT_DIR/index-rankN.jsonl`` list one sample per line (id, text, tokens,
shard, row, ...). A shard is renamed into place before its lines are appended
in one write, so an indexed sample always has its maps; a run killed halfway
leaves at most an unindexed shard (ignored) or a partial last line (ignored,
and cut off by the next run of that rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import load_file
from torch import Tensor

from .engine import image_maps_from_capacity

SHARD_DIR = "shards"
OVERLAY_DIR = "overlays"
INDEX_PATTERN = "index-rank*.jsonl"


FAILURES_PATTERN = "failures-rank*.jsonl"
FAILURES_FILE = "failures.jsonl"


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write a whole file or nothing: into a hidden temporary file beside it, flushed, then renamed.

    ``data`` is the content, or a function that writes the file at the path it is given.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if callable(data):
        data(tmp)
    else:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def index_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / f"index-rank{rank}.jsonl"


def failures_path(output_dir: Path, rank: int | str) -> Path:
    """Raw log of records that failed (or were changed) while loading on one rank."""
    return Path(output_dir) / f"failures-{rank if isinstance(rank, str) else f'rank{rank}'}.jsonl"


def safe_name(sample_id: str, max_length: int = 80) -> str:
    """A file name for a sample id that stays inside its directory: no separators, no leading dots, a hash suffix."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id).strip("_")[:max_length] or "sample"
    return f"{stem}-{hashlib.sha1(sample_id.encode()).hexdigest()[:10]}"


def _jsonl_entries(output_dir: str | Path, pattern: str) -> list[dict]:
    """Every complete line of the matching files, in file order; a half-written last line is ignored."""
    entries = []
    for path in sorted(Path(output_dir).glob(pattern)):
        text = path.read_text()
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        entries.extend(json.loads(line) for line in complete.splitlines() if line.strip())
    return entries


def index_entries(output_dir: str | Path) -> list[dict]:
    """Every index line of every rank."""
    return _jsonl_entries(output_dir, INDEX_PATTERN)


def merged_failures(output_dir: str | Path) -> list[dict]:
    """The records of the latest run that were skipped or changed, one report per (id, severity).

    Up-front failures (``failures-manifest.jsonl``) are those of the latest run's source; load-time
    reports of the ranks are kept unless a later attempt attributed that id.
    """
    done = done_ids(output_dir)
    upfront = _jsonl_entries(output_dir, failures_path(output_dir, "manifest").name)
    loaded = _jsonl_entries(output_dir, FAILURES_PATTERN)
    latest = {(f["id"], f["severity"]): f for f in loaded if f["severity"] != "error" or f["id"] not in done}
    return upfront + list(latest.values())


def done_ids(output_dir: str | Path) -> set[str]:
    return {entry["id"] for entry in index_entries(output_dir)}


@dataclass
class AttributionRecord:
    id: str
    text: str
    tokens: list[str]
    image_map: Tensor  # (H, W) in [0, 1], at the model input's size
    text_map: Tensor  # (length,) in [0, 1]
    image_capacity: Tensor  # (rows, cols) raw nats on the patch grid
    text_capacity: Tensor  # (length,) raw nats
    image_fit: float
    text_fit: float


def read_attributions(output_dir: str | Path) -> Iterator[AttributionRecord]:
    """One record per sample of a run, merged over ranks and shards, each id once."""
    output_dir = Path(output_dir)
    seen: set[str] = set()
    shards: dict[str, dict[str, Tensor]] = {}
    for entry in index_entries(output_dir):
        if entry["id"] in seen:
            continue
        seen.add(entry["id"])
        if entry["shard"] not in shards:
            shards.clear()  # entries of a shard are contiguous: keep one shard in memory
            shards[entry["shard"]] = load_file(output_dir / SHARD_DIR / entry["shard"])
        tensors, row, length = shards[entry["shard"]], entry["row"], entry["length"]
        grid = tensors["image_capacity"][row]
        yield AttributionRecord(
            id=entry["id"],
            text=entry["text"],
            tokens=entry["tokens"],
            image_map=image_maps_from_capacity(grid.flatten()[None], tuple(grid.shape), tuple(entry["image_size"]))[0],
            text_map=tensors["text_map"][row, :length],
            image_capacity=grid,
            text_capacity=tensors["text_capacity"][row, :length],
            image_fit=entry["image_fit"],
            text_fit=entry["text_fit"],
        )

