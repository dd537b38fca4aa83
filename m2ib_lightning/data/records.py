"""What a run attributes and what it reports about records it could not attribute as they were."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image


@dataclass
class PairRecord:
    """One pair to attribute; ``load_image`` is called in the data loader's worker."""

    id: str
    text: str
    load_image: Callable[[], Image.Image]


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
