"""Adapter for Hugging Face ``transformers.LlavaForConditionalGeneration``: M2IB explains the answer.

The sequence the language model reads is the processor's prompt (``<image>``
expanded to one id per image feature) followed by the answer; the logits at
position P - 1 + t predict answer token t. Each sample's real prompt tokens
(left or right padding removed) and real answer tokens are laid out from
position 0, as in its solo run, and the batch is right-padded after them, so
padding never reaches a real token. The image bottleneck sits on a block of
the vision tower (CLS included, for a CLIP tower); the text bottleneck on a
language-model layer at the prompt's real, non-image positions.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.world_dataset import pad_token_ids
from .base import AnswerBatch, HFAnswerLayout, Modality, real_tokens, resolve_layer


def is_hf_llava(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("vision_tower", "multi_modal_projector", "language_model")) and hasattr(model, "lm_head")


class HFLlavaAnswerer(HFAnswerLayout):
    """Runs a ``LlavaForConditionalGeneration`` on prompts and answers, with bottlenecks placed by the M2IB fit."""

    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"

    def __init__(self, model: nn.Module, processor: Any = None):
        if not is_hf_llava(model):
            raise TypeError(f"HFLlavaAnswerer wraps a transformers LlavaForConditionalGeneration, got {type(model).__name__}")
        self.module, self.processor, self.config = model, processor, model.config
        vision = self.config.vision_config
        self.num_prefix_tokens = 1 if getattr(vision, "model_type", "") == "clip_vision_model" else 0

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_hf_llava(model)

    # ------------------------------------------------------------------ layout
    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        """Vision-tower blocks for ``image`` (transformers 4.x nests the tower once more), LM layers for ``text``."""
        inner = self.module.model
        if modality == "image":
            tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
            return tower.encoder.layers
        return inner.language_model.layers

    def resolve_layer(self, modality: Modality, layer: int, name: str) -> int:
        """A block index; an image bottleneck after the earliest block ``vision_feature_layer`` reads is refused,
        since the language model would read features from before it."""
        count = self.num_layers(modality)
        index = resolve_layer(layer, count, name, "the vision tower" if modality == "image" else "the language model")
        if modality == "image":
            read = self.config.vision_feature_layer
            earliest = min((f % (count + 1)) - 1 for f in (read if isinstance(read, (list, tuple)) else [read]))
            if index > earliest:
                raise ValueError(f"{name}={layer} is block {index}, after block {earliest}, the earliest whose output the "
                                 f"language model reads (vision_feature_layer={read}): the bottleneck would be bypassed")
        return index

    # ------------------------------------------------------------------ inputs
    def answer_batch(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                     answer_mask: Tensor) -> AnswerBatch:
        """Each sample's real prompt then its real answer from position 0, the batch right-padded after them."""
        image_token = self.config.image_token_id
        pad = self.config.text_config.pad_token_id or 0
        prompts, answers = real_tokens(input_ids, attention_mask, "input_ids"), real_tokens(answer_ids, answer_mask, "answer_ids")
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        batch, longest = len(prompts), max(len(a) for a in answers)
        ids = input_ids.new_full((batch, width), pad)
        mask = torch.zeros_like(ids)
        score_index = torch.zeros(batch, longest, dtype=torch.long, device=ids.device)
        targets = torch.zeros_like(score_index)
        score_mask = torch.zeros(batch, longest, dtype=torch.bool, device=ids.device)
        for b, (prompt, answer) in enumerate(zip(prompts, answers)):
            p, a = len(prompt), len(answer)
            ids[b, :p], ids[b, p:p + a], mask[b, :p + a] = prompt, answer, 1
            score_index[b, :a] = torch.arange(p - 1, p - 1 + a, device=ids.device)
            targets[b, :a], score_mask[b, :a] = answer, True
        text = torch.zeros_like(mask, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            text[b, :len(prompt)] = prompt != image_token
        rows, cols = self.patch_grid(pixel_values)
        tokens = self.num_prefix_tokens + rows * cols  # the vision tower's tokens, CLS included where there is one
        return AnswerBatch(
            inputs={"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
                    "position_ids": torch.arange(width, device=ids.device).expand(batch, width)},
            positions={"image": torch.ones(batch, tokens, dtype=torch.bool, device=ids.device), "text": text},
            input_columns=[keep.bool().nonzero()[:, 0] for keep in attention_mask],
            prompt_columns=[torch.arange(len(p), device=ids.device) for p in prompts],
            score_index=score_index, targets=targets, score_mask=score_mask,
        )

    @torch.no_grad()
    def generate_answers(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         max_new_tokens: int = 16) -> tuple[Tensor, Tensor]:
        """Each sample's greedy answer (its real prompt alone, so padding plays no part), up to EOS (not included)."""
        eos = self.config.text_config.eos_token_id
        answers = []
        for b in range(len(input_ids)):
            prompt = input_ids[b][attention_mask[b].bool()][None]
            out = self.module.generate(input_ids=prompt, pixel_values=pixel_values[b:b + 1], attention_mask=torch.ones_like(prompt),
                                       max_new_tokens=max_new_tokens, do_sample=False)[0, prompt.shape[1]:]
            stop = (out == eos).nonzero()
            answers.append(out[: int(stop[0]) if len(stop) else len(out)])
        ids, mask = pad_token_ids([list(map(int, answer)) for answer in answers], 0)
        return ids.to(input_ids.device), mask.to(input_ids.device)

    def answer_log_likelihood(self, batch: AnswerBatch, copies: int = 1) -> Tensor:
        """(B * copies,) sum over real answer tokens of log_softmax(logits)[answer], each sample's rows repeated
        ``copies`` times (the K noise copies); only the positions that predict answer tokens reach the vocabulary."""
        inputs = {k: v.repeat_interleave(copies, dim=0) for k, v in batch.inputs.items()}
        keep = torch.unique(batch.score_index[batch.score_mask])
        logits = self.module(**inputs, logits_to_keep=keep).logits  # (B * copies, len(keep), V)
        column = torch.searchsorted(keep, batch.score_index).repeat_interleave(copies, dim=0)
        picked = logits.gather(1, column[..., None].expand(-1, -1, logits.shape[-1]))
        scores = F.log_softmax(picked, dim=-1).gather(-1, batch.targets.repeat_interleave(copies, dim=0)[..., None])[..., 0]
        return (scores * batch.score_mask.repeat_interleave(copies, dim=0)).sum(1)
