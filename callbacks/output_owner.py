"""Who may write into an output directory: one run at a time, of one identity, decided before anything is written."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch

from m2ib_lightning.results import (
    OutputInUse, OutputMismatch, RunLock, atomic_write, claim_identity, count_done, done_ids,
)

_REFUSALS = {cls.__name__: cls for cls in (OutputInUse, OutputMismatch)}


class OutputOwner(L.Callback):
    """Rank 0 takes ``OUTPUT_DIR/run.lock`` and checks (or writes) the run's identity ``run.json``; the outcome
    is broadcast, so a refused run stops on every rank at once (also under torchrun or SLURM, where the other
    ranks exist from the start), before any other callback writes. Then every process pins its intra-op
    thread count to the identity's (maps are bitwise the same across topologies only with the same count),
    rank 0 saves the config, and every rank reads the ids already done (``done``; with ``share``, a function of
    (rank, world size) giving the filter of the ids that rank's readers can meet, only those: memory grows with
    the rank's share, not with the output).

    Put it first in the trainer's callbacks, call :meth:`claim` once the Trainer exists, and :meth:`release`
    once the run's last file is written. ``on_owned`` functions are called with (trainer, done ids)
    on every rank once the output is owned.
    """

    def __init__(
        self, output_dir: str | Path, identity: dict[str, Any], config_yaml: str, *, threads: int | None = None,
        on_owned: tuple[Callable[[L.Trainer, set[str]], None], ...] = (),
        share: Callable[[int, int], Callable[[str], bool]] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.identity, self.config_yaml, self.threads, self.on_owned = identity, config_yaml, threads, on_owned
        self.share = share
        self.lock = RunLock(self.output_dir)
        self.done: set[str] = set()
        self.done_count = 0  # samples in the output on every rank (``done`` may hold this rank's share only)
        self.decision: tuple[str, str] | dict[str, Any] | None = None
        self.threads_before: int | None = None

    def _claim(self) -> tuple[str, str] | dict[str, Any]:
        """Rank 0: the lock and the identity, or the refusal (class name, message)."""
        try:
            self.lock.acquire()
            return claim_identity(self.output_dir, self.identity, self.threads)
        except (OutputInUse, OutputMismatch) as err:
            self.lock.release()
            return type(err).__name__, str(err)

    def _own(self, decision: tuple[str, str] | dict[str, Any], rank: int, world_size: int = 1) -> None:
        if isinstance(decision, (tuple, list)):
            raise _REFUSALS[decision[0]](decision[1])
        self.threads_before = torch.get_num_threads()  # given back at release: a run in a notebook leaves it as it was
        torch.set_num_threads(int(decision["threads"]))
        if rank == 0:
            for orphan in self.output_dir.glob(".*.tmp"):  # temporary files of a killed run's atomic writes
                orphan.unlink(missing_ok=True)
            atomic_write(self.output_dir / "config.yaml", self.config_yaml)
        keep = None if self.share is None else self.share(rank, world_size)
        self.done = done_ids(self.output_dir, keep)
        self.done_count = len(self.done) if keep is None else count_done(self.output_dir)

    def claim(self, trainer: L.Trainer) -> None:
        """Rank 0 decides as soon as the Trainer exists, before it writes anything (its logger's directory);
        a refusal is raised at once where no other rank exists yet (one process, or Lightning's own launcher,
        which starts the others in predict), else in :meth:`setup` on every rank together."""
        if trainer.global_rank != 0:
            return
        self.decision = self._claim()
        environment = getattr(trainer.strategy, "cluster_environment", None)  # None: a single-device strategy
        if isinstance(self.decision, tuple) and not (environment is not None and environment.creates_processes_externally):
            self._own(self.decision, 0)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.global_rank == 0 and self.decision is None:
            self.decision = self._claim()
        decision = trainer.strategy.broadcast(self.decision if trainer.global_rank == 0 else {})
        self._own(decision, trainer.global_rank, trainer.world_size)
        for hook in self.on_owned:
            hook(trainer, self.done)

    @contextlib.contextmanager
    def owning(self) -> Iterator[None]:
        """The same for a run of one process without a Trainer."""
        try:
            self._own(self._claim(), 0)
            yield
        finally:
            self.release()

    def release(self) -> None:
        """End of the run (the task calls it after its last write, also on errors; predict's end is too early):
        the lock, and the process's intra-op thread count as it was before the run."""
        self.lock.release()
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
            self.threads_before = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.lock.release()
