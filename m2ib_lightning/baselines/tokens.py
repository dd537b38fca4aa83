"""Which tokens a text method leaves alone (special ones) and which id stands in for a removed word."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def replacement_token(backbone: Any, configured: int | None = None) -> int:
    """The id that replaces words in text perturbations: ``configured``, else the adapter's ``neutral_token_id``
    (else its padding id). Refused if it is one of the adapter's ``structural_token_ids`` (BOS/EOS/CLS/SEP):
    a caption with an extra end-of-text token pools elsewhere, and the score would measure that instead."""
    chosen = configured if configured is not None else getattr(backbone, "neutral_token_id", None)
    chosen = backbone.pad_token_id if chosen is None else int(chosen)
    try:
        structural = getattr(backbone, "structural_token_ids", set())
    except RuntimeError:  # an adapter built without its tokenizer: a configured id is taken as it is
        structural = set()
    if chosen in structural:
        where = "replacement_id" if configured is not None else f"{type(backbone).__name__}'s neutral/padding id"
        raise ValueError(f"{where}={chosen} is a structural token of the tokenizer (BOS/EOS/CLS/SEP ids "
                         f"{sorted(structural)}): a word replaced by it moves where the text tower pools; choose an "
                         "ordinary token id")
    return chosen


def special_tokens(backbone: Any, input_ids: Tensor) -> Tensor:
    """(B, L) True at BOS/EOS/CLS/SEP/padding, from the adapter's tokenizer."""
    return torch.tensor([backbone.special_mask(row) for row in input_ids.tolist()], dtype=torch.bool, device=input_ids.device)
