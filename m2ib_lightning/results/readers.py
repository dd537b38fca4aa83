"""Reading a run back as a stream: the index, the failures, the maps of each sample (also at the original size)
and an evaluation's per-sample records; nothing is held whole."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import load_file
from torch import Tensor

from ..engine import image_maps_from_capacity
from .files import FAILURES_PATTERN, IDENTITY_FILE, INDEX_PATTERN, SHARD_DIR


def _complete_lines(path: Path) -> Iterator[str]:
    """The complete lines of a file, streamed; a half-written last line is left out."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n") and line.strip():
                yield line


def _jsonl(output_dir: str | Path, pattern: str) -> Iterator[dict]:
    for path in sorted(Path(output_dir).glob(pattern)):
        for line in _complete_lines(path):
            yield json.loads(line)


def index_entries(output_dir: str | Path) -> Iterator[dict]:
    """Every index line of every rank, streamed; FileNotFoundError naming ``output_dir`` where it holds no run."""
    path = Path(output_dir)
    if not (path / IDENTITY_FILE).is_file() and not any(path.glob(INDEX_PATTERN)):
        raise FileNotFoundError(f"{str(path)!r} holds no run (no {IDENTITY_FILE}, no index): pass the output_dir of a "
                                "train.py run")
    return _jsonl(path, INDEX_PATTERN)


_ID_PREFIX = '{"id": '
_decoder = json.JSONDecoder()


def done_ids(output_dir: str | Path, keep: Callable[[str], bool] | None = None) -> set[str]:
    """The ids already in the output (only those ``keep`` accepts: a rank's own share): all a run reads at start-up.

    The index writes the id first, so only that string is decoded from each line.
    """
    done = set()
    for path in Path(output_dir).glob(INDEX_PATTERN):
        for line in _complete_lines(path):
            if line.startswith(_ID_PREFIX):
                sample_id = _decoder.raw_decode(line, len(_ID_PREFIX))[0]
            else:
                sample_id = json.loads(line)["id"]
            if keep is None or keep(sample_id):
                done.add(sample_id)
    return done


def count_done(output_dir: str | Path) -> int:
    """Samples in the output (complete index lines), counted without decoding them."""
    total = 0
    for path in Path(output_dir).glob(INDEX_PATTERN):
        with open(path, "rb") as handle:
            total += sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    return total


def merged_failures(output_dir: str | Path, run_token: str) -> list[dict]:
    """The records the latest run skipped, and every record ever changed (warnings), one report per (id, severity).

    Every run retries the records earlier runs failed on (they are not done), so the errors of
    the run ``run_token`` are all the errors that stand; a warning belongs to a done sample,
    which later runs skip, so warnings of earlier runs are kept.
    """
    latest = {}
    for report in _jsonl(output_dir, FAILURES_PATTERN):
        if report["severity"] == "warning" or report.get("run") == run_token:
            latest[(report["id"], report["severity"])] = {k: report[k] for k in ("id", "reason", "severity")}
    return list(latest.values())


@dataclass
class AttributionRecord:
    id: str
    text: str
    tokens: list[str]
    image_map: Tensor  # (H, W) in [0, 1], at the model input's size (or the original image's, if asked)
    text_map: Tensor  # (length,) in [0, 1]
    image_capacity: Tensor  # (rows, cols) raw nats on the patch grid
    text_capacity: Tensor  # (length,) raw nats
    image_fit: float
    text_fit: float
    answer: str | None = None  # a VQA run's: the answer explained
    answer_source: str | None = None  # "given" (the data's) or "generate" (the model's own greedy answer)
    special: list[bool] | None = None  # per token: left out of displays (special tokens, a prompt's template)


def shard_names(output_dir: str | Path) -> list[str]:
    """The indexed shards of a run, in index order, for reading one shard at a time."""
    names: dict[str, None] = {}
    for entry in index_entries(output_dir):
        names.setdefault(entry["shard"], None)
    return list(names)


def indexed_samples(output_dir: Path, shard: str | None = None) -> Iterator[tuple[dict, dict[str, Tensor]]]:
    """(index entry, tensors of its shard) per sample, streamed with one shard in memory at a time."""
    tensors: dict[str, Tensor] = {}
    loaded = None
    for entry in index_entries(output_dir):
        if shard is not None and entry["shard"] != shard:
            continue
        if entry["shard"] != loaded:  # a shard's entries are contiguous in its rank's index
            tensors, loaded = load_file(output_dir / SHARD_DIR / entry["shard"]), entry["shard"]
        yield entry, tensors


def read_attributions(
    output_dir: str | Path, *, shard: str | None = None, original_size: bool = False
) -> Iterator[AttributionRecord]:
    """One record per sample of a run, streamed over ranks and shards (one shard in memory at a time).

    ``shard`` reads only that shard's samples. ``original_size`` returns each image map in the
    coordinates of the original image (undoing the processor's resize and centre crop; the
    part of the image the crop cut off is 0).
    """
    for entry, tensors in indexed_samples(Path(output_dir), shard):
        row, length = entry["row"], entry["length"]
        rows, cols = entry["patch_grid"]
        grid = tensors["image_capacity"][row, :rows, :cols]  # a shard pads pictures of other sizes to its largest
        image_map = image_maps_from_capacity(grid.flatten()[None], tuple(grid.shape), tuple(entry["image_size"]))[0]
        if original_size:
            image_map = to_original_size(image_map, entry)
        yield AttributionRecord(
            id=entry["id"],
            text=entry["text"],
            tokens=entry["tokens"],
            image_map=image_map,
            text_map=tensors["text_map"][row, :length],
            image_capacity=grid,
            text_capacity=tensors["text_capacity"][row, :length],
            image_fit=entry["image_fit"],
            text_fit=entry["text_fit"],
            answer=entry.get("answer"),
            answer_source=entry.get("answer_source"),
            special=entry.get("special"),
        )


@dataclass
class EvaluationRecord:
    id: str
    text: str
    tokens: list[str]
    maps: dict[str, tuple[Tensor, Tensor | None]]  # method -> (image map (H, W), text map (length,) or None)
    values: dict[str, dict[str, float | None]]  # method -> metric -> value (None: does not apply to this sample)


def read_evaluation(output_dir: str | Path) -> Iterator[EvaluationRecord]:
    """The samples of an evaluation run with every method's maps and metric values, streamed one shard at a time."""
    for entry, tensors in indexed_samples(Path(output_dir)):
        row, length = entry["row"], entry["length"]
        maps = {
            method: (tensors[f"{method}/image"][row], tensors[f"{method}/text"][row, :length] if f"{method}/text" in tensors else None)
            for method in entry["values"]
        }
        yield EvaluationRecord(entry["id"], entry["text"], entry["tokens"], maps, entry["values"])


def to_original_size(image_map: Tensor, entry: dict) -> Tensor:
    """A map at the model input's size put back onto the original image, from the geometry in the index."""
    from ..backbones.base import ImageGeometry

    geometry = entry.get("geometry")
    if geometry is None:
        raise ValueError(f"sample {entry['id']!r} was written without its image geometry; rerun it to get original_size maps")
    return ImageGeometry(**geometry).to_original(image_map)
