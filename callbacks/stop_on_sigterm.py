"""Stop a predict run on SIGTERM (a scheduler's preemption or cancel) after the batch in hand."""

from __future__ import annotations

import signal
import sys

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopOnSigterm(L.Callback):
    """Lightning catches SIGTERM in every run but only fit and validation look at it: a predict run would go on to
    its end. After each batch (placed last, so the writers have taken it), a run that received SIGTERM stops with
    status 143; the writers keep what is done and the owner releases the lock, so rerunning the command resumes."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.received_sigterm:
            print(f"received SIGTERM: stopped after batch {batch_idx}; rerun the same command to resume", file=sys.stderr)
            raise SIGTERMException(128 + signal.SIGTERM)
