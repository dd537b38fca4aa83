"""What a run attributes and what it reports about records it could not attribute as they were."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image


@dataclass
class PairRecord:
    """One pair to attribute (a caption, or a question and perhaps its answer); ``load_image`` is called in the data
    loader's worker."""

    id: str
    text: str  # the caption, or the question
    load_image: Callable[[], Image.Image]
    load_mask: Callable[[], "np.ndarray"] | None = None  # ground truth for localisation, where it exists
    target_class: str | None = None  # what the ground truth shows, for the per-class pointing game
    answer: str | None = None  # a question's answer to explain; None: the model's own


class BadImage(ValueError):
    """An image that cannot be attributed; the message is the recorded reason."""


@dataclass(frozen=True)
class Failure:
    """A record that was skipped (``severity='error'``) or handled with a change (``'warning'``)."""

    id: str
    reason: str
    severity: str = "error"

    def to_json(self) -> dict:
        return {"id": self.id, "reason": self.reason, "severity": self.severity}


def by_position(
    entries: Iterable[PairRecord | Failure], slot: int, slots: int, skip: set[str] | frozenset = frozenset()
) -> Iterator[PairRecord | Failure]:
    """The entries at positions ``slot``, ``slot + slots``, ... of a stream, minus records already done.

    Every rank and loader worker reads the same stream and keeps its own share, so each
    record (and each failure report) belongs to exactly one of them.
    """
    for position, entry in enumerate(entries):
        if position % slots == slot and (isinstance(entry, Failure) or entry.id not in skip):
            yield entry
