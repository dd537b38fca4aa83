"""What the attention methods share: attention probabilities (and gradients) read through the adapter, folded into
relevance. Dual encoders (``attention`` capability): each tower's self-attention, from the position it pools. VLMs
that answer (``answer_attention`` capability): the adapter's attention graph of token groups (one sequence for a
decoder VLM; image, question and answer joined by cross-attention for BLIP VQA), from the positions that predict
the answer's tokens."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..backbones.base import tower_inputs
from ..backbones.capabilities import require
from ..engine import image_maps_from_capacity, minmax
from .base import AttributionMethod, Maps, _block_input, _hooked, _replace_hidden
from .scoring import AnswerScorer

#: relevance between token groups: (group of the rows, group of the columns) -> (rows, columns)
Relevance = dict[tuple[str, str], Tensor]


class _AttentionMethod(AttributionMethod):
    """Methods that fold attention probabilities into relevance, from R = I (each token relevant to itself): a
    method says how one self-attention (:meth:`_step`) and one cross-attention (:meth:`_cross`) update it."""

    has_text_map = True
    needs_gradients = False

    def __init__(self, backbone: Any, **settings: Any):
        super().__init__(backbone, **settings)
        self.answers = isinstance(self.scorer, AnswerScorer)
        require(self.backbone, "answer_attention" if self.answers else "attention", f"the {self.name} method")

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        if self.answers:
            rows = [self._answer_maps(pixel_values[b:b + 1], input_ids[b:b + 1], attention_mask[b:b + 1], b)
                    for b in range(len(input_ids))]
            return Maps(torch.cat([r.image for r in rows]), torch.cat([r.text for r in rows]))
        image = self._relevance("image", pixel_values, input_ids, attention_mask)
        text = self._relevance("text", pixel_values, input_ids, attention_mask)
        return Maps(self.token_map(image, pixel_values), minmax(text, attention_mask.bool()))

    # ------------------------------------------------------------------ dual encoders
    def _relevance(self, modality, pixel_values, input_ids, attention_mask) -> Tensor:
        """(B, T) relevance of each token of one tower for its pooled embedding."""
        inputs = tower_inputs(modality, pixel_values, input_ids, attention_mask)
        score = (self.image_score(input_ids, attention_mask) if modality == "image"
                 else self.text_score(pixel_values, attention_mask))
        argument = pixel_values if modality == "image" else input_ids
        modules = self.backbone.attention_modules(modality)
        probs, grads = self._attention(modules, lambda: score(argument))
        tokens = probs[0].shape[-1]
        relevance = torch.eye(tokens, dtype=probs[0].dtype, device=probs[0].device).expand(probs[0].shape[0], tokens, tokens)
        for attention, grad in list(zip(probs, grads))[self.first_block(modality, len(modules)):]:
            relevance = self._step(relevance, attention, grad)
        state = self.backbone.prefix(modality, inputs, 0)
        if state.pool_index is None:  # attention-pooling head: every token feeds the embedding
            return relevance.mean(1)
        return relevance[torch.arange(relevance.shape[0], device=relevance.device), state.pool_index]

    # ------------------------------------------------------------------ answers
    def _answer_maps(self, pixel_values, input_ids, attention_mask, row: int) -> Maps:
        """One sample's maps for log p(answer): the relevance rows of the positions that predict the answer's tokens,
        summed, read at the image's cells (the image map) and at the prompt's tokens (the text map)."""
        with self.scorer.only(row):
            batch = self.scorer.answer_batch(pixel_values, input_ids, attention_mask)
            graph = self.backbone.attention_graph()
            probs, grads = self._attention([module for module, _, _ in graph],
                                           lambda: self.backbone.answer_log_likelihood(batch))
            readout = self.backbone.attention_readout(batch)
            relevance = self._fold(graph, probs, grads)

            def read(group: str) -> Tensor:
                block = relevance.get((readout.score_group, group))
                if block is None:
                    raise RuntimeError(f"{self.name}: no attention of the adapter's graph leads from group "
                                       f"{readout.score_group!r} to group {group!r}")
                return block[readout.score_rows].sum(0)[None]

            cells = read(readout.image_group)[:, readout.image_cells]
            image = image_maps_from_capacity(cells, readout.grid, tuple(pixel_values.shape[-2:]))
            text = self.scorer.text_columns(read(readout.text_group), pixel_values, input_ids, attention_mask)
        return Maps(image, minmax(text, attention_mask.bool()))

    def _fold(self, graph: list[tuple[nn.Module, str, str]], probs: list[Tensor], grads: list[Tensor | None]) -> Relevance:
        """The relevance between the graph's token groups after its attention from entry :meth:`first_block` on, each
        group relevant to itself alone at the start (R = I) and to no other group."""
        relevance: Relevance = {}
        first = self.first_block("text", len(graph))
        for index, ((_, queries, keys), attention, grad) in enumerate(zip(graph, probs, grads)):
            attention, grad = attention[0], None if grad is None else grad[0]
            for group, size in ((queries, attention.shape[-2]), (keys, attention.shape[-1])):
                relevance.setdefault((group, group), torch.eye(size, dtype=attention.dtype, device=attention.device))
            if index < first:
                continue
            if queries == keys:
                for (rows, columns), values in list(relevance.items()):
                    if rows == queries:
                        relevance[rows, columns] = self._step(values, attention, grad)
            else:
                self._cross(relevance, queries, keys, attention, grad)
        return relevance

    def _attention(self, modules: list[nn.Module], run: Callable[[], Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
        """Each module's attention probabilities while ``run()`` computes the scores (eager attention), and, for
        methods that need them, the gradients of the scores' sum with respect to them. With gradients, a module
        whose input carries no graph (a frozen model builds none of its own) gets that input as a leaf."""
        calls: list[list[Tensor]] = [[] for _ in modules]

        def keeper(index: int):
            return lambda module, args, output: calls[index].append(output[1])

        def into_graph(module, args, kwargs):
            hidden = _block_input(args, kwargs)
            return None if hidden.requires_grad else _replace_hidden(args, kwargs, hidden.detach().requires_grad_())

        with contextlib.ExitStack() as stack:
            stack.enter_context(self.backbone.eager_attention())
            for index, module in enumerate(modules):
                stack.enter_context(_hooked(module, pre=into_graph if self.needs_gradients else None, post=keeper(index)))
            with torch.set_grad_enabled(self.needs_gradients):
                scores = run()
        if any(len(c) != 1 or c[0] is None for c in calls):
            raise RuntimeError(f"{self.name}: each attention module must run once and return its probabilities (eager "
                               f"attention; transformers 5 is needed); they ran {[len(c) for c in calls]} times")
        probs = [c[0] for c in calls]
        grads = torch.autograd.grad(scores.sum(), probs) if self.needs_gradients else [None] * len(probs)
        folded = torch.promote_types(probs[0].dtype, torch.float32)  # relevance of a half-precision model in float32
        return [p.detach().to(folded) for p in probs], [None if g is None else g.detach().to(folded) for g in grads]

    def first_block(self, modality: str, count: int) -> int:
        """The first block (on answers: entry of the attention graph) whose attention enters the relevance."""
        return 0

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        """Self-attention of the rows' group: the relevance of those rows to any group, updated."""
        raise NotImplementedError

    def _cross(self, relevance: Relevance, queries: str, keys: str, attention: Tensor, grad: Tensor | None) -> None:
        """Cross-attention from group ``queries`` to group ``keys``: the queries' relevance to every group, updated in
        place (a block not there yet is zero)."""
        raise NotImplementedError


def residual_normalised(relevance: Tensor) -> Tensor:
    """Chefer et al.'s normalisation of a group's self-relevance before a cross-attention (their eqs. 8-9): the
    identity taken out, each row scaled to sum 1 (a row with nothing left stays 0), the identity put back."""
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
    rest = relevance - eye
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / torch.where(total > 0, total, 1), 0) + eye
