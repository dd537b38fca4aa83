"""The score every method explains and every faithfulness metric follows: the cosine of a pair's embeddings, or,
for a VLM that answers questions, log p(answer) under teacher forcing."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import as_backbone
from ..backbones.base import tower_inputs
from ..backbones.capabilities import claimed


class PairScorer:
    """The score every method explains and every faithfulness metric follows: the cosine similarity of a pair's
    embeddings, with one side perturbed and the other side clean."""

    def __init__(self, backbone: Any):
        self.backbone = as_backbone(backbone)

    def embedding(self, modality: str, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.backbone.embed(modality, tower_inputs(modality, pixel_values, input_ids, attention_mask)), dim=-1)

    def clean(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) scores of the unperturbed pairs."""
        with torch.no_grad():
            return (self.embedding("image", pixel_values, None, None) * self.embedding("text", None, input_ids, attention_mask)).sum(-1)

    def image_score(self, input_ids: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        """f(pixels) = cos(image embedding, the clean caption embedding); k images per caption come grouped by sample."""
        with torch.no_grad():
            text = self.embedding("text", None, input_ids, attention_mask)

        def score(pixel_values: Tensor) -> Tensor:
            image = self.embedding("image", pixel_values, None, None)
            return (image * text.repeat_interleave(image.shape[0] // text.shape[0], dim=0)).sum(-1)

        return score

    def text_score(self, pixel_values: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        """f(ids) = cos(caption embedding, the clean image embedding); k captions per image come grouped by sample."""
        with torch.no_grad():
            image = self.embedding("image", pixel_values, None, None)

        def score(input_ids: Tensor) -> Tensor:
            copies = input_ids.shape[0] // image.shape[0]
            text = self.embedding("text", None, input_ids, attention_mask.repeat_interleave(copies, dim=0))
            return (text * image.repeat_interleave(copies, dim=0)).sum(-1)

        return score


    @contextlib.contextmanager
    def only(self, row: int) -> Iterator[None]:
        """Scores of sample ``row`` alone (nothing to narrow for pairs: the caption is the argument)."""
        yield

    @staticmethod
    def confidence(scores: Tensor) -> Tensor:
        """What the confidence metrics and RISE read: the cosine itself."""
        return scores

    @staticmethod
    def text_columns(values: Tensor, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Per-position values of the text tower's blocks as (B, L) aligned with ``input_ids``: already so."""
        return values


class AnswerScorer:
    """The score every method explains for a VLM that answers questions: log p(answer) under teacher forcing (the
    adapter's ``answer_log_likelihood``), the question or the picture perturbed and the other clean. The batch's
    answers are bound (``bind``) before a method or a metric runs; k perturbed copies come grouped by sample."""

    def __init__(self, backbone: Any):
        self.backbone = as_backbone(backbone)
        self.answers: tuple[Tensor, Tensor] | None = None

    def bind(self, answer_ids: Tensor, answer_mask: Tensor) -> None:
        self.answers = (answer_ids, answer_mask)

    @contextlib.contextmanager
    def only(self, row: int) -> Iterator[None]:
        """Scores of sample ``row`` alone: its answer."""
        saved = self._bound()
        self.answers = tuple(t[row:row + 1] for t in saved)
        try:
            yield
        finally:
            self.answers = saved

    @staticmethod
    def confidence(scores: Tensor) -> Tensor:
        """What the confidence metrics and RISE read: the answer's probability."""
        return scores.exp()

    def text_columns(self, values: Tensor, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Per-position values of the text blocks (the prompt laid out without padding, then the answer) as (B, L)
        aligned with ``input_ids``: the question's and the template's tokens; 0 at image tokens and padding."""
        batch = self.backbone.answer_batch(pixel_values, input_ids, attention_mask, *self._bound())
        out = values.new_zeros(input_ids.shape)
        for b, (columns, positions) in enumerate(zip(batch.input_columns, batch.prompt_columns)):
            out[b, columns] = values[b, positions] * batch.positions["text"][b, positions]
        return out

    def _bound(self) -> tuple[Tensor, Tensor]:
        if self.answers is None:
            raise RuntimeError("no answers bound: call bind(answer_ids, answer_mask) first (or pass answers=...)")
        return self.answers

    def answer_batch(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Any:
        """The adapter's layout of the rows of ``input_ids`` with the bound answers (repeated to those rows)."""
        ids, mask = self._bound()
        copies = input_ids.shape[0] // ids.shape[0]
        return self.backbone.answer_batch(pixel_values, input_ids, attention_mask, ids.repeat_interleave(copies, 0),
                                          mask.repeat_interleave(copies, 0))

    def log_p(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(rows,) log p(bound answer), the answers repeated to the rows of ``input_ids``."""
        return self.backbone.answer_log_likelihood(self.answer_batch(pixel_values, input_ids, attention_mask))

    def clean(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.no_grad():
            return self.log_p(pixel_values, input_ids, attention_mask)

    def image_score(self, input_ids: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        def score(pixel_values: Tensor) -> Tensor:
            copies = pixel_values.shape[0] // input_ids.shape[0]
            return self.log_p(pixel_values, input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0))

        return score

    def text_score(self, pixel_values: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        def score(input_ids: Tensor) -> Tensor:
            copies = input_ids.shape[0] // pixel_values.shape[0]
            return self.log_p(pixel_values.repeat_interleave(copies, 0), input_ids, attention_mask.repeat_interleave(copies, 0))

        return score


def scorer_of(backbone: Any) -> PairScorer | AnswerScorer:
    """The score a backbone's methods explain: log p(answer) for a VLM that answers, else the pair's cosine."""
    adapter = as_backbone(backbone)
    return AnswerScorer(adapter) if "answers" in claimed(adapter) else PairScorer(adapter)
