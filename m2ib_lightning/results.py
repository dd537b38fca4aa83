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

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
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


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None], *, tmp: Path | None = None) -> None:
    """Write a whole file or nothing: into a temporary file beside it (a unique name unless ``tmp`` is given),
    fsynced, renamed into place, then the directory fsynced, so the file and its name survive an OS crash.

    ``data`` is the content, or a function that writes the file at the path it is given. The file
    gets the permissions of the process umask, whatever the writer created the temporary file with.
    """
    path = Path(path)
    if tmp is None:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as handle:
                handle.write(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_lines(path: Path, lines: list[str]) -> None:
    """Append in one write, flushed to disk: the lines land together."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())


def last_line(path: Path) -> str | None:
    """The last complete line of a file, reading only its tail (None if it has none)."""
    if not path.exists():
        return None
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            tail = handle.read(end - start) + tail
            lines = tail.split(b"\n")
            if len(lines) >= 3 or (start == 0 and len(lines) >= 2):
                return lines[-2].decode("utf-8", errors="replace")  # lines[-1]: after the last newline
            end = start
    return None


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


def pending_path(output_dir: Path, rank: int) -> Path:
    """The name of the shard a rank is committing (written before the shard, removed after its index append)."""
    return Path(output_dir) / SHARD_DIR / f".rank{rank}.pending"


def pending_ranks(output_dir: Path) -> list[int]:
    """The ranks (of any earlier topology) that left a pending commit behind."""
    names = (Path(output_dir) / SHARD_DIR).glob(".rank*.pending*")
    return sorted({int(p.name[len(".rank"):].split(".")[0]) for p in names})


def settle_pending(output_dir: Path, rank: int) -> None:
    """After a kill: remove the shard (and its temporary file) a rank was committing unless its index lines
    landed (the index's last line names it); reads only the file tails."""
    pending = pending_path(output_dir, rank)
    pending.with_name(pending.name + ".tmp").unlink(missing_ok=True)
    try:
        name = pending.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return
    last = last_line(index_path(output_dir, rank))
    committed = bool(name) and last is not None and json.loads(last).get("shard") == name
    if name and not committed:
        for orphan in (Path(output_dir) / SHARD_DIR / name, Path(output_dir) / SHARD_DIR / f".{name}.tmp"):
            orphan.unlink(missing_ok=True)
    pending.unlink(missing_ok=True)


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
            answer=entry.get("answer"),
            answer_source=entry.get("answer_source"),
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


# ------------------------------------------------------------------------- identity and lock
class OutputRefused(RuntimeError):
    """This run may not write into its output_dir; the message says why (``train.py`` exits 2 with it)."""


class OutputInUse(OutputRefused):
    """Another live run writes into the same output_dir."""


class OutputMismatch(OutputRefused, ValueError):
    """The output_dir holds a run of another task or with other result settings."""


IDENTITY_FILE = "run.json"
#: bumped when the files of a run change in a way older readers or resumes cannot follow
LAYOUT_VERSION = 1


def run_identity(task: str, settings: dict[str, Any], model_revision: str | None = None) -> dict[str, Any]:
    """What makes a run's results what they are: its task, the settings that change them, the layout, the model
    revision (a hub checkpoint's commit where there is one), and the intra-op thread count (set by the first run)."""
    return {"task": task, "layout": LAYOUT_VERSION, "model_revision": model_revision,
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)), "threads": None}


def _differences(key: str, saved: Any, asked: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, asked value) of each leaf setting that differs, e.g. ``m2ib.beta``."""
    if isinstance(saved, dict) and isinstance(asked, dict):
        return [d for name in sorted(set(saved) | set(asked)) for d in _differences(f"{key}.{name}", saved.get(name), asked.get(name))]
    return [] if saved == asked else [(key, saved, asked)]


def claim_identity(output_dir: str | Path, identity: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """The identity a run in ``output_dir`` must keep: written by the first run, checked by every later one.

    ``threads``: the intra-op thread count asked for (None: the first run's, or this process's). Raises
    :class:`OutputMismatch` naming what differs. Call it holding the run lock.
    """
    path = Path(output_dir) / IDENTITY_FILE
    asked = dict(identity)
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise OutputMismatch(f"{path} is damaged ({err}); it names the run this output_dir holds") from None
        where = f"output_dir={str(path.parent)!r} holds a {saved.get('task')!r} run"
        if saved.get("task") != asked["task"]:
            raise OutputMismatch(f"{where}; a {asked['task']!r} run cannot write into it: choose another output_dir")
        if saved.get("layout") != asked["layout"]:
            raise OutputMismatch(f"{where} of layout {saved.get('layout')} (this version writes {asked['layout']}): "
                                 "choose another output_dir")
        for key in sorted(set(saved["settings"]) | set(asked["settings"])):
            if saved["settings"].get(key) != asked["settings"].get(key):
                changes = ", ".join(f"{name}={old!r} (asked: {new!r})"
                                    for name, old, new in _differences(key, saved["settings"].get(key), asked["settings"].get(key)))
                raise OutputMismatch(f"output_dir={str(path.parent)!r} holds a run with other `{key}` settings: {changes}; "
                                     "resume it with the same settings or choose another output_dir")
        if saved.get("model_revision") != asked["model_revision"] and asked["model_revision"] is not None:
            raise OutputMismatch(f"{where} of model revision {saved.get('model_revision')}, this one loads "
                                 f"{asked['model_revision']}: pin model.revision or choose another output_dir")
        if threads is not None and saved.get("threads") not in (None, threads):
            raise OutputMismatch(f"{where} with {saved['threads']} intra-op threads per process (threads={threads} asked): "
                                 "maps are bitwise the same only with the same count; leave `threads` unset to keep it")
        return saved
    if any(Path(output_dir).glob(INDEX_PATTERN)):
        raise OutputMismatch(f"output_dir={str(output_dir)!r} holds results without a {IDENTITY_FILE} (another tool's, "
                             "or an older version's): choose another output_dir")
    asked["threads"] = threads if threads is not None else torch.get_num_threads()
    atomic_write(path, json.dumps(asked, indent=2, sort_keys=True))
    return asked


class RunLock:
    """``OUTPUT_DIR/run.lock``: one run at a time per output directory, held as a kernel lock.

    ``fcntl.flock`` on an open descriptor: the kernel gives it to one process only and
    takes it back when that process dies, however it dies, so a killed run's lock is
    free at once and two runs can never both take over a stale one. The file also
    holds the pid, host and start time of its run, for the message that refuses another.
    The holder removes the file when it is done; an acquirer checks that the file it
    locked is still the one at the path (it may have been removed in between).
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputInUse(self._refusal()) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed the file between our open and flock: again
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _refusal(self) -> str:
        owner = None
        for _ in range(20):  # the holder writes its record right after taking the lock
            try:
                owner = json.loads(self.path.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.01)
        who = "another run" if owner is None else (
            f"the run of pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}")
        return f"output_dir={str(self.path.parent)!r} is in use by {who}; wait for it or choose another output_dir"

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can lock the removed file in between
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
