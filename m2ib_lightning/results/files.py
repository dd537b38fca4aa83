"""The files of a run: their names and paths, atomic writes and appends, and settling a commit a kill left
halfway."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable



SHARD_DIR = "shards"
OVERLAY_DIR = "overlays"
INDEX_PATTERN = "index-rank*.jsonl"
FAILURES_PATTERN = "failures-rank*.jsonl"
FAILURES_FILE = "failures.jsonl"
LOCK_FILE = "run.lock"
IDENTITY_FILE = "run.json"


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
