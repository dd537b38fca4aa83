"""The on-disk layout of an attribution run, and reading it back as a stream.

``OUTPUT_DIR/shards/rankR-RUN-NNNNN.safetensors`` each hold up to
``export.samples_per_shard`` samples of one rank; ``OUTPUT_DIR/index-rankR.jsonl``
lists one sample per line (id first, then text, tokens, shard, row, ...). A shard
is renamed into place before its lines are appended in one fsynced write, so an
indexed sample always has its maps; a run killed halfway loses at most the samples
of its open shards (never indexed, so the rerun redoes them) and leaves at most a
partial last index line (ignored, and cut off by the next run of that rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
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
LOCK_FILE = "run.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write a whole file or nothing: into a hidden temporary file beside it, flushed, then renamed.

    ``data`` is the content, or a function that writes the file at the path it is given. The file
    gets the permissions of the process umask, whatever the writer created the temporary file with.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if callable(data):
        data(tmp)
    else:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def append_lines(path: Path, lines: list[str]) -> None:
    """Append in one write, flushed to disk: the lines land together."""
    with open(path, "a") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())


def cut_partial_line(path: Path) -> None:
    """Drop a last line left half-written by a killed run, so that new lines start clean.

    Reads only the file's tail: start-up cost does not grow with the index.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        end = size
        while end > 0:  # find the last newline, reading backwards in blocks
            start = max(0, end - 65536)
            handle.seek(start)
            block = handle.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                handle.truncate(start + cut + 1)
                break
            end = start
        else:
            handle.truncate(0)
        handle.flush()
        os.fsync(handle.fileno())


def index_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / f"index-rank{rank}.jsonl"


def failures_path(output_dir: Path, rank: int) -> Path:
    """Log of records that failed (or were changed) on one rank, every run appending."""
    return Path(output_dir) / f"failures-rank{rank}.jsonl"


def safe_name(sample_id: str, max_length: int = 80) -> str:
    """A file name for a sample id that stays inside its directory: no separators, no leading dots, a hash suffix."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id).strip("_")[:max_length] or "sample"
    return f"{stem}-{hashlib.sha1(sample_id.encode()).hexdigest()[:10]}"


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
    """Every index line of every rank, streamed."""
    return _jsonl(output_dir, INDEX_PATTERN)


_ID_PREFIX = '{"id": '
_decoder = json.JSONDecoder()


def done_ids(output_dir: str | Path) -> set[str]:
    """The ids already in the output: all a run reads at start-up.

    The index writes the id first, so only that string is decoded from each line.
    """
    done = set()
    for path in Path(output_dir).glob(INDEX_PATTERN):
        for line in _complete_lines(path):
            if line.startswith(_ID_PREFIX):
                done.add(_decoder.raw_decode(line, len(_ID_PREFIX))[0])
            else:
                done.add(json.loads(line)["id"])
    return done


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


def shard_names(output_dir: str | Path) -> list[str]:
    """The indexed shards of a run, in index order, for reading one shard at a time."""
    names: dict[str, None] = {}
    for entry in index_entries(output_dir):
        names.setdefault(entry["shard"], None)
    return list(names)


def _indexed_samples(output_dir: Path, shard: str | None = None) -> Iterator[tuple[dict, dict[str, Tensor]]]:
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
    for entry, tensors in _indexed_samples(Path(output_dir), shard):
        row, length = entry["row"], entry["length"]
        grid = tensors["image_capacity"][row]
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
    for entry, tensors in _indexed_samples(Path(output_dir)):
        row, length = entry["row"], entry["length"]
        maps = {
            method: (tensors[f"{method}/image"][row], tensors[f"{method}/text"][row, :length] if f"{method}/text" in tensors else None)
            for method in entry["values"]
        }
        yield EvaluationRecord(entry["id"], entry["text"], entry["tokens"], maps, entry["values"])


def to_original_size(image_map: Tensor, entry: dict) -> Tensor:
    """A map at the model input's size put back onto the original image, from the geometry in the index."""
    from .backbones.base import ImageGeometry

    geometry = entry.get("geometry")
    if geometry is None:
        raise ValueError(f"sample {entry['id']!r} was written without its image geometry; rerun it to get original_size maps")
    return ImageGeometry(**geometry).to_original(image_map)


# ------------------------------------------------------------------------- lock
class OutputInUse(RuntimeError):
    """Another live run writes into the same output_dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``OUTPUT_DIR/run.lock``: one run at a time per output directory.

    Holds the pid, host and start time of its run. A lock whose process is gone
    (same host) is stale and taken over; a live one is refused, naming it. A lock
    from another host cannot be checked: it is refused, and the message says how
    to remove it if that run is known to be gone.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (owner.get("host") != me["host"] or _alive(int(owner.get("pid", -1)))):
                    where = "" if owner.get("host") == me["host"] else f" on host {owner.get('host')}"
                    raise OutputInUse(
                        f"output_dir={str(self.path.parent)!r} is in use by the run of pid {owner.get('pid')}{where}, "
                        f"started {owner.get('started')}; wait for it, choose another output_dir, or delete "
                        f"{self.path} if that run is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale (its process is gone) or unreadable: take it over
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise OutputInUse(f"could not take the lock {self.path}: another run took it at the same moment")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
