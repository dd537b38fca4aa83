"""One run at a time per output directory: ``run.lock``, a kernel lock."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .files import LOCK_FILE, _umask
from .identity import OutputInUse


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
