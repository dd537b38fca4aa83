"""What the adapters of VLMs whose language model reads the image inside its prompt share (LLaVA, Qwen2-VL).

The sequence the language model reads is the processor's prompt (the image
placeholder expanded to one id per image feature) followed by the answer; the
logits at position P - 1 + t predict answer token t. Each sample's real prompt
tokens (left or right padding removed) and real answer tokens are laid out from
position 0, as in its solo run, and the batch is right-padded after them, so
padding never reaches a real token. The text bottleneck sits on a
language-model layer at the prompt's real, non-image positions; where the image
bottleneck sits, and how a family's images travel with its samples, each
family's adapter says.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from typing import Any, Callable

import torch
from torch import Tensor

from .base import (
    AnswerBatch, AttentionReadout, HFAnswerLayout, ImageLayout, Modality, attention_probabilities, block_output,
    eager_attention, pad_token_ids, real_tokens, token_log_probs,
)
from .capabilities import Site

#: the inputs that carry the image into a forward (Qwen2-VL's grid with its packed patches)
IMAGE_INPUTS = ("pixel_values", "image_grid_thw")

#: the probe sites of a language-model layer: the residual stream after it, the attention output (the input of
#: ``o_proj``, where the heads are still apart) whole or split into query heads, and the MLP's output proper
LANGUAGE_SITES = ("resid", "attn", "head", "mlp")
#: the probe sites of a vision-tower block: its output, its MLP's output, its attention output before the output
#: projection whole or split into heads
VISION_SITES = ("resid", "mlp", "self_attn", "self_head")


class _Embedded(Exception):
    """Raised by the pre-hook that takes the language model's input embeddings: nothing after them runs."""

    def __init__(self, embeds: Tensor):
        self.embeds = embeds


class _LastLayerInput(Exception):
    """Raised by the pre-hook on the language model's last layer: what it was called with (it does not run)."""

    def __init__(self, hidden: Tensor, kwargs: dict[str, Any]):
        self.hidden, self.kwargs = hidden, kwargs


def rows_computable(layer: torch.nn.Module) -> bool:
    """Whether :func:`layer_at_rows` can stand for ``layer``: a pre-norm decoder layer (``input_layernorm``,
    ``self_attn`` with q/k/v/o projections and the rotary embedding of its modeling file, ``post_attention_layernorm``,
    ``mlp``) with full causal attention, and nothing observing it (no forward hook on it or inside it: a hook
    would miss the positions not computed)."""
    attn = getattr(layer, "self_attn", None)
    parts = all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")) and attn is not None
    if not parts or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return False
    if getattr(attn, "sliding_window", None) is not None or not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
        return False
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())


def layer_at_rows(layer: torch.nn.Module, hidden: Tensor, kwargs: dict[str, Any], rows: Tensor) -> Tensor:
    """The output of decoder ``layer`` at sequence positions ``rows`` only, (B, len(rows), D), from its input
    ``hidden`` (B, L, D) and the other arguments the model called it with (``position_embeddings``, the mask): keys
    and values at every position, queries, attention output and MLP at ``rows``. The layer's own attention in
    eager form (softmax in >= float32), so the numbers are the whole layer's at those rows."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)

    def heads(x: Tensor) -> Tensor:
        return x.view(batch, x.shape[1], -1, attn.head_dim).transpose(1, 2)

    query, key, value = heads(attn.q_proj(normed[:, rows])), heads(attn.k_proj(normed)), heads(attn.v_proj(normed))
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = kwargs["position_embeddings"]
    query = rotate(query, query, cos[:, rows], sin[:, rows])[0]
    key = rotate(key, key, cos, sin)[1]
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves ``groups`` query heads
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * attn.scaling
    mask = kwargs.get("attention_mask")
    if mask is None:  # the model relied on causal attention alone
        mask = torch.arange(length, device=rows.device)[None, :] <= rows[:, None]
    else:
        mask = mask[:, :, rows, :length]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores + mask, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    out = attn.o_proj(torch.matmul(weights, value).transpose(1, 2).reshape(batch, len(rows), -1))
    residual = hidden[:, rows] + out
    return residual + layer.mlp(layer.post_attention_layernorm(residual))


class HFDecoderAnswerer(HFAnswerLayout):
    """Prompt-then-answer layout, teacher-forced log p(answer) and greedy answers for a decoder VLM."""

    module: Any

    def image_layout(self, pixel_values: Tensor, batch: int, **model_inputs: Tensor) -> tuple[Tensor, ImageLayout]:
        """(B, T) image-bottleneck positions and where they lie on the pictures."""
        raise NotImplementedError

    def sequence_inputs(self, ids: Tensor, mask: Tensor, pixel_values: Tensor, **model_inputs: Tensor) -> dict[str, Tensor]:
        """The forward's inputs for laid-out ``ids`` (positions counted from each sample's first real token)."""
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
                "position_ids": torch.arange(ids.shape[1], device=ids.device).expand_as(ids)}

    def repeat_inputs(self, inputs: dict[str, Tensor], copies: int) -> dict[str, Tensor]:
        """The forward's inputs with each sample repeated ``copies`` times in a row."""
        return {k: v.repeat_interleave(copies, dim=0) for k, v in inputs.items()}

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    # ------------------------------------------------------------------ inputs
    def answer_batch(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                     answer_mask: Tensor, **model_inputs: Tensor) -> AnswerBatch:
        """Each sample's real prompt then its real answer from position 0, the batch right-padded after them."""
        pad = self.config.text_config.pad_token_id or 0
        prompts, answers = real_tokens(input_ids, attention_mask, "input_ids"), real_tokens(answer_ids, answer_mask, "answer_ids")
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        batch, longest = len(prompts), max(len(a) for a in answers)
        ids = input_ids.new_full((batch, width), pad)
        mask = torch.zeros_like(ids)
        score_index = torch.zeros(batch, longest, dtype=torch.long, device=ids.device)
        targets = torch.zeros_like(score_index)
        score_mask = torch.zeros(batch, longest, dtype=torch.bool, device=ids.device)
        text = torch.zeros_like(mask, dtype=torch.bool)
        for b, (prompt, answer) in enumerate(zip(prompts, answers)):
            p, a = len(prompt), len(answer)
            ids[b, :p], ids[b, p:p + a], mask[b, :p + a] = prompt, answer, 1
            score_index[b, :a] = torch.arange(p - 1, p - 1 + a, device=ids.device)
            targets[b, :a], score_mask[b, :a] = answer, True
            text[b, :p] = prompt != self.image_token_id
        keep = torch.unique(score_index[score_mask])  # the positions whose logits reach the vocabulary
        image_positions, layout = self.image_layout(pixel_values, batch, **model_inputs)
        return AnswerBatch(
            inputs=self.sequence_inputs(ids, mask, pixel_values, **model_inputs),
            positions={"image": image_positions, "text": text},
            image=layout,
            input_columns=[keep.bool().nonzero()[:, 0] for keep in attention_mask],
            prompt_columns=[torch.arange(len(p), device=ids.device) for p in prompts],
            score_positions=keep, score_index=torch.searchsorted(keep, score_index), targets=targets, score_mask=score_mask,
        )

    @torch.no_grad()
    def fit_inputs(self, modality: Modality, batch: AnswerBatch) -> AnswerBatch:
        """For the text fit, the language model's input embeddings (the image features in place) once: the vision
        tower and the projector do not run again at each step."""
        if modality == "image":
            return batch
        captured: dict[str, Tensor] = {}

        def keep(module: Any, args: Any, kwargs: dict) -> None:
            captured["inputs_embeds"] = kwargs["inputs_embeds"]

        language_model = self._language_model()
        handle = language_model.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            self.module(**batch.inputs, logits_to_keep=1)
        finally:
            handle.remove()
        inputs = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", *IMAGE_INPUTS)}
        return dataclasses.replace(batch, inputs={**inputs, "inputs_embeds": captured["inputs_embeds"]})

    def _language_model(self) -> Any:
        """The decoder stack the prompt's embeddings enter (``model.language_model`` in 5.x, ``model`` in 4.x)."""
        inner = self.module.model
        return getattr(inner, "language_model", inner)

    @torch.no_grad()
    def generate_answers(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         max_new_tokens: int = 16, **model_inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample's greedy answer (its real prompt alone, so padding plays no part), up to EOS (not included)."""
        eos = self.config.text_config.eos_token_id
        stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, **model_inputs}
        answers = []
        for b in range(len(input_ids)):
            one = self.sample_inputs(inputs, b)
            prompt = one.pop("input_ids")[one.pop("attention_mask").bool()][None]
            ids, mask = prompt, torch.ones_like(prompt)
            extra = self.sequence_inputs(ids, mask, **one)
            extra.pop("position_ids")  # generate counts positions itself
            out = self.module.generate(**extra, max_new_tokens=max_new_tokens, do_sample=False)[0, prompt.shape[1]:]
            stop = [i for i, token in enumerate(out.tolist()) if token in stops]
            answers.append(out[: stop[0] if stop else len(out)])
        ids, mask = pad_token_ids([list(map(int, answer)) for answer in answers], 0)
        return ids.to(input_ids.device), mask.to(input_ids.device)

    def answer_log_likelihood(self, batch: AnswerBatch, copies: int = 1) -> Tensor:
        """(B * copies,) sum over real answer tokens of log_softmax(logits)[answer], each sample's rows repeated
        ``copies`` times (the K noise copies); only the positions that predict answer tokens reach the vocabulary."""
        inputs = self.repeat_inputs(batch.inputs, copies)
        return self._scored(lambda: self.module(**inputs, logits_to_keep=batch.score_positions, use_cache=False), batch, copies)

    def _scored(self, forward: Callable[[], Any], batch: AnswerBatch, copies: int) -> Tensor:
        """log p(answer) of a model ``forward`` (logits at ``batch.score_positions``), the language model's last layer
        computed at those positions only (:func:`layer_at_rows`); the whole layer where it cannot be
        (:func:`rows_computable`: another form, or something observing it)."""
        last = self.blocks("text")[-1]
        if not rows_computable(last):
            return self._answer_scores(forward().logits, batch, copies)

        def stop(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            raise _LastLayerInput(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})

        handle, taken = last.register_forward_pre_hook(stop, with_kwargs=True), None
        try:
            forward()
        except _LastLayerInput as stopped:
            taken = stopped
        finally:
            handle.remove()
        if taken is None:
            raise RuntimeError("the language model's last layer did not run")
        return self.answer_from_last_input(batch, taken.hidden, taken.kwargs, copies)

    def answer_from_last_input(self, batch: AnswerBatch, hidden: Tensor, kwargs: dict[str, Any], copies: int) -> Tensor:
        """(B * copies,) log p(answer) from the input of the language model's last layer and the other arguments it
        is called with: that layer, the final norm and the vocabulary projection at the answer-predicting positions
        only (the whole layer where :func:`rows_computable` says no)."""
        last, rows = self.blocks("text")[-1], batch.score_positions
        out = layer_at_rows(last, hidden, kwargs, rows) if rows_computable(last) else block_output(last(hidden, **kwargs))[:, rows]
        return self._scores_from_rows(batch, out, copies)

    def _scores_from_rows(self, batch: AnswerBatch, rows: Tensor, copies: int) -> Tensor:
        """(B * copies,) log p(answer) from the last layer's output at ``batch.score_positions``: final norm, vocabulary."""
        return self._answer_scores(self.module.lm_head(self._language_model().norm(rows)), batch, copies)

    def _answer_scores(self, logits: Tensor, batch: AnswerBatch, copies: int) -> Tensor:
        """(B * copies,) log p(answer) from the logits (B * copies, score positions, V) at ``batch.score_positions``."""
        column = batch.score_index.repeat_interleave(copies, dim=0)
        picked = logits.gather(1, column[..., None].expand(-1, -1, logits.shape[-1]))
        scores = token_log_probs(picked, batch.targets.repeat_interleave(copies, dim=0))
        return (scores * batch.score_mask.repeat_interleave(copies, dim=0)).sum(1)

    # ------------------------------------------------------------------ explicit tail runs
    def tail_end(self, modality: Modality) -> int | None:
        """The block whose output :meth:`answer_from_block` scores from: the language model's last layer, or the
        vision block whose output becomes the image features (None: no tail run for this tower)."""
        return self.num_layers("text") - 1 if modality == "text" else self.image_feature_block()

    def image_feature_block(self) -> int | None:
        """The vision block whose output :meth:`image_features` turns into language-model tokens."""
        raise NotImplementedError

    def image_features(self, hidden: Tensor) -> Tensor:
        """The output of :meth:`image_feature_block` (the batch repeated) as the language model's image tokens."""
        raise NotImplementedError

    def answer_from_block(self, modality: Modality, batch: AnswerBatch, hidden: Tensor, copies: int) -> Tensor:
        """(B * copies,) log p(answer) from the output of block :meth:`tail_end` for the batch repeated ``copies``
        times: the final norm and the vocabulary projection at the answer-predicting positions (text), or the image
        tokens in place of the image placeholders and the language model (image), as the model's forward does."""
        if modality == "text":
            return self._scores_from_rows(batch, hidden[:, batch.score_positions], copies)
        text_inputs = {k: v for k, v in batch.inputs.items() if k not in IMAGE_INPUTS}
        inputs = self.repeat_inputs(text_inputs, copies)  # the image comes from ``hidden``: never repeated here
        ids = inputs.pop("input_ids")
        embeds = self.module.get_input_embeddings()(ids)
        features = self.image_features(hidden).to(embeds.dtype)
        embeds = embeds.masked_scatter((ids == self.image_token_id)[..., None].expand_as(embeds), features)
        return self._scored(lambda: self.module(inputs_embeds=embeds, **inputs, logits_to_keep=batch.score_positions,
                                                use_cache=False), batch, copies)

    # ------------------------------------------------------------------ probing
    probe_towers: tuple[str, ...] = ("language",)

    def default_probe_tower(self, modality: Modality) -> str:
        """The language model, which every corruption reaches (the image as its image tokens)."""
        return "language"

    def probe_sites(self, tower: str) -> tuple[str, ...]:
        return LANGUAGE_SITES

    def probe_layers(self, tower: str) -> int:
        return self.num_layers("text" if tower == "language" else "image")

    def probe_site(self, tower: str, name: str, layer: int) -> Site:
        """Language-model sites; a head is a query head: with grouped-query attention the heads of one group share
        their keys and values, and head h is still dimensions [h*d, (h+1)*d) of ``o_proj``'s input."""
        block = self.blocks("text")[layer]
        if name == "resid":
            return Site(block, "output")
        if name == "mlp":
            return Site(block.mlp, "output")
        if name in ("attn", "head"):
            return Site(block.self_attn.o_proj, "input", self.config.text_config.num_attention_heads if name == "head" else None)
        raise ValueError(f"site {name!r} is not one of the {tower} tower's {self.probe_sites(tower)}")

    def decision_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, modality: Modality,
                        **model_inputs: Tensor) -> dict:
        """Sample 0: its image inputs and its real prompt tokens (padding dropped, so every position is a token)."""
        one = self.sample_inputs({"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
                                  **model_inputs}, 0)
        real = one["attention_mask"][0].bool()
        return {**one, "input_ids": one["input_ids"][:, real], "attention_mask": one["attention_mask"][:, real]}

    def _prompt_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        extra = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids", "attention_mask")}
        return self.sequence_inputs(ids, torch.ones_like(ids) if mask is None else mask, inputs["pixel_values"], **extra)

    def prompt_embeddings(self, inputs: dict[str, Tensor]) -> Tensor:
        """The language model's input embeddings of a prompt (image features in place), as the model's own forward
        makes them; the language model itself does not run."""
        def take(module: Any, args: Any, kwargs: dict) -> None:
            raise _Embedded(kwargs["inputs_embeds"])

        handle = self._language_model().register_forward_pre_hook(take, with_kwargs=True)
        try:
            self.module(**inputs, logits_to_keep=1, use_cache=False)
        except _Embedded as taken:
            return taken.embeds
        finally:
            handle.remove()
        raise RuntimeError("the language model was not called with inputs_embeds")

    def _embedded_prompt(self, prompt: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """A laid-out prompt's input embeddings, and its other inputs (mask, positions) without ids and image."""
        return self.prompt_embeddings(prompt), {k: v for k, v in prompt.items() if k not in ("input_ids", *IMAGE_INPUTS)}

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        """(rows, vocab) logits of the first answer token (after the prompt's last position). Language-model sites:
        the vision tower and the projector run once, their embeddings repeated; vision sites: the whole model per row."""
        prompt = self._prompt_inputs(inputs)
        if tower != "language":
            return self.module(**self.repeat_inputs(prompt, rows), logits_to_keep=1, use_cache=False).logits[:, -1]
        embeds, text = self._embedded_prompt(prompt)
        repeated = self.repeat_inputs({**text, "inputs_embeds": embeds}, rows)
        return self.module(**repeated, logits_to_keep=1, use_cache=False).logits[:, -1]

    def decision_prefix(self, inputs: dict[str, Tensor], tower: str, start: int) -> dict[str, Any] | None:
        """For cells that change only positions ``start`` and later (causal attention: nothing before them moves):
        the language model run once over the first ``start`` positions, its key/value cache kept, so that
        :meth:`decision_logits_after` computes only the rest. None where that does not apply (another tower)."""
        if tower != "language" or start <= 0:
            return None
        embeds, text = self._embedded_prompt(self._prompt_inputs(inputs))
        head = {k: v[..., :start] for k, v in text.items()}  # positions last in every input (Qwen2-VL's 3-D ones too)
        out = self.module(**head, inputs_embeds=embeds[:, :start], use_cache=True, logits_to_keep=1)
        tail = {k: v if k == "attention_mask" else v[..., start:] for k, v in text.items()}  # the mask spans the cache
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers >= 5.24 names it cache
        return {"cache": cache, "inputs": {**tail, "inputs_embeds": embeds[:, start:]}}

    def decision_logits_after(self, prefix: dict[str, Any], rows: int) -> Tensor:
        """(rows, vocab) first-answer-token logits from :meth:`decision_prefix`'s cache: the positions after it alone
        run (in the site hooks, position ``start`` is position 0)."""
        cache = copy.deepcopy(prefix["cache"])  # the forward appends to it
        cache.batch_repeat_interleave(rows)
        inputs = self.repeat_inputs(prefix["inputs"], rows)
        named = "cache" if "cache" in inspect.signature(self.module.forward).parameters else "past_key_values"
        return self.module(**inputs, **{named: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]

    def pooled_position(self, tower: str, inputs: dict[str, Tensor]) -> int:
        """The prompt's last position, whose output predicts the answer's first token."""
        if tower != "language":
            raise ValueError(f"the {tower} tower does not pool: use positions='each' or 'all'")
        return inputs["input_ids"].shape[-1] - 1

    def image_keys(self, tower: str, inputs: dict[str, Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """Where the image's cells sit among the tower's positions (the keys its heads attend to), in raster order of
        the image's token grid, and that grid: the prompt's image tokens for the language model."""
        if tower != "language":
            raise ValueError(f"image_keys: the {tower} tower is not this adapter's language model")
        grid = self.language_image_grid(inputs)
        return self.image_cell_positions(inputs["input_ids"][0], grid), grid

    def language_image_grid(self, inputs: dict[str, Tensor]) -> tuple[int, int]:
        """(rows, cols) of the image tokens the language model reads, in raster order."""
        raise NotImplementedError

    def language_image_prefix(self) -> int:
        """How many of the prompt's image tokens come before the cells and stand for none (a CLS feature)."""
        return 0

    def image_cell_positions(self, ids: Tensor, grid: tuple[int, int]) -> Tensor:
        """The positions in one prompt ``ids`` of the image tokens that stand for the grid's cells, in raster order;
        ValueError where the prompt holds another number of image tokens."""
        positions = (ids == self.image_token_id).nonzero()[:, 0]
        prefix, (rows, cols) = self.language_image_prefix(), grid
        if len(positions) != prefix + rows * cols:
            raise ValueError(f"the prompt holds {len(positions)} image tokens, its picture gives {rows} x {cols} cells"
                             + (f" after {prefix} feature(s) of no cell" if prefix else ""))
        return positions[prefix:]

    # ------------------------------------------------------------------ attention over the sequence (rollout, Chefer)
    def attention_graph(self) -> list[tuple[torch.nn.Module, str, str]]:
        """The language model's self-attention, layer by layer, over its one sequence (image tokens, prompt, answer);
        the vision tower's attention is not part of it (the image tokens enter as the projector's features)."""
        return [(block.self_attn, "sequence", "sequence") for block in self.blocks("text")]

    def eager_attention(self) -> Any:
        """Attention in eager mode (probabilities returned); the model's setting comes back after."""
        return eager_attention(self.module)

    def attention_readout(self, batch: AnswerBatch) -> AttentionReadout:
        """The positions predicting the answer's tokens, the prompt's image tokens (one per cell of the grid the
        language model reads, in raster order, as the processor expands them) and the prompt, in the one sequence."""
        grid = self.language_image_grid(batch.inputs)
        cells = self.image_cell_positions(batch.inputs["input_ids"][0], grid)
        scored = batch.score_positions[batch.score_index[0][batch.score_mask[0]]]
        return AttentionReadout("sequence", scored, "sequence", cells, grid, "sequence")

    def head_attention(self, tower: str, inputs: dict[str, Tensor]) -> list[Tensor]:
        """Per layer, the self-attention probabilities (1, heads, T, T) of the tower (eager attention meanwhile)."""
        modules = [block.self_attn for block in self.blocks("text" if tower == "language" else "image")]
        with torch.no_grad(), eager_attention(self.module):
            return attention_probabilities(modules, lambda: self.decision_logits(inputs, 1, tower))
