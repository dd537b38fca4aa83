"""Aggregating patching results over pairs: means without flagged pairs, head rankings, template roles."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .patching import PatchingResult


def mean_effect(results: Sequence[PatchingResult]) -> tuple[Tensor, Tensor, int]:
    """Mean over the unflagged pairs, the raw (pairs, ...) stack (NaN for flagged pairs), and how many were flagged.

    Pairs of different token counts are NaN-padded along positions; the mean skips the padding.
    A group whose pairs are all flagged gets an all-NaN mean (reported, not fatal).
    """
    width = max(r.effect.shape[1] for r in results)
    stack = torch.stack([
        F.pad(r.effect, (0, 0) * (r.effect.dim() - 2) + (0, width - r.effect.shape[1]), value=math.nan)
        for r in results
    ])
    kept = stack[[not r.flagged for r in results]]
    flagged = len(results) - len(kept)
    if not len(kept):
        return torch.full(stack.shape[1:], math.nan), stack, flagged
    return kept.nanmean(0), stack, flagged


def important_heads(mean_abs_effect: Tensor, num_std: float = 2.0) -> list[tuple[int, int]]:
    """(layer, head) whose mean |effect| is at least the mean plus ``num_std`` population standard deviations
    over all heads of the site (NOTICE's rule, numpy's std). Heads whose effects are all equal (std 0) stand
    out from nothing: none is important."""
    if mean_abs_effect.dim() != 2:
        raise ValueError(f"mean_abs_effect must be (layers, heads), got {tuple(mean_abs_effect.shape)}")
    values = mean_abs_effect.nan_to_num(0.0)
    spread = values.std(correction=0)
    if spread <= 1e-12 * values.abs().max().clamp_min(1e-300):
        return []
    threshold = values.mean() + num_std * spread
    return [tuple(idx) for idx in (values >= threshold).nonzero().tolist()]


HEAD_RANKINGS = ("notice", "effect")


def answer_position(tokens: Sequence[str], answer_tokens: Sequence[str]) -> int | None:
    """NOTICE's answer token: the first token of the question whose piece contains the answer's first piece
    (its substring rule, ``##`` markers kept), as a position of ``tokens`` (the model's input pieces); None if none."""
    if not answer_tokens:
        return None
    first = answer_tokens[0]
    return next((i for i, token in enumerate(tokens) if first in token), None)


def head_scores(result: dict[str, Tensor], ranking: str, position: int | None = None) -> Tensor | None:
    """(layers, heads) score of every head in one pair, the input of :func:`important_heads`.

    ``notice``: the restoration probability P(correct answer) with that head patched at the answer token alone
    (``result["patched_prob"]`` of a positions="each" run, (layers, positions, heads)), as NOTICE ranks heads;
    ``effect``: |normalised effect| of the head patched at every position at once ((layers, heads)), ours.
    None where the pair gives no score (no answer token; for ``effect``, a flagged pair).
    """
    if ranking == "notice":
        prob = result["patched_prob"]
        if position is None or prob.dim() != 3:
            return None
        return prob[:, position, :].abs().nan_to_num(0.0)  # NOTICE: NaN -> 0
    if ranking == "effect":
        effect = result["effect"]
        return None if result["flagged"] or effect.dim() != 2 else effect.abs()
    raise ValueError(f"ranking must be one of {list(HEAD_RANKINGS)}, got {ranking!r}")


def universal_heads(important: dict[tuple[str, str, str, str], list[tuple[int, int]]]) -> dict[str, list[tuple[int, int]]]:
    """Heads important in every task and corruption modality, per ``tower/site``.

    ``important`` maps (task, corrupted modality, tower, site) to that group's important heads;
    a head index of one tower (or site) is never compared with another's.
    """
    by_site: dict[str, list[set[tuple[int, int]]]] = {}
    for (_, _, tower, site), heads in important.items():
        by_site.setdefault(f"{tower}/{site}", []).append({tuple(h) for h in heads})
    return {key: sorted(set.intersection(*groups)) for key, groups in by_site.items()}


def effect_by_role(effects: Sequence[Tensor], roles: Sequence[Sequence[str]], flagged: Sequence[bool] | None = None) -> tuple[Tensor, list[str]]:
    """Mean effect per (layer, template role) over pairs, never by raw position across templates.

    ``effects[i]`` is (layers, positions[, ...]) for pair i, ``roles[i]`` one role name per position
    (e.g. "[CLS]", "is", "NOUN", "OPTION_A", "?", "[SEP]"). Roles keep the order in which they first
    appear; flagged pairs are left out.
    """
    order: list[str] = []
    for pair_roles in roles:
        order.extend(r for r in pair_roles if r not in order)
    flagged = flagged or [False] * len(effects)
    template = effects[0]
    total = torch.zeros(template.shape[0], len(order), *template.shape[2:])
    count = torch.zeros(len(order))
    for effect, pair_roles, skip in zip(effects, roles, flagged):
        if skip:
            continue
        if effect.shape[1] != len(pair_roles):
            raise ValueError(f"a pair has {effect.shape[1]} positions but {len(pair_roles)} roles")
        for position, role in enumerate(pair_roles):
            total[:, order.index(role)] += effect[:, position]
            count[order.index(role)] += 1
    mean = total / count.clamp(min=1).view((1, -1) + (1,) * (total.dim() - 2))
    mean[:, count == 0] = math.nan
    return mean, order
