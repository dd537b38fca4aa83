"""Adapter for Hugging Face ``transformers.BlipForQuestionAnswering``: M2IB explains the answer.

Vision tower -> image-grounded text encoder (the question, cross-attending to every image
token) -> answer decoder, as the model's own ``forward`` runs them (which returns no
decoder logits in transformers 5.x). Decoder input = [decoder_start_token_id] + answer;
the logits at decoder position t predict answer token t. Each question is laid out from
position 0 without its padding (BERT positions are absolute), and the decoder reads each
sample's real question tokens only: transformers' BLIP answer decoder ignores
``encoder_attention_mask``, so a padded question would leak into the answer. The image
bottleneck sits on a vision block (CLS included), the text bottleneck on a text-encoder
layer at the question's real tokens ([CLS] and [SEP] included).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor, nn

from .base import (
    AnswerBatch, AttentionReadout, HFAnswerLayout, ImageLayout, Modality, attention_probabilities, one_image_per_sample,
    pad_token_ids, real_tokens, resolve_layer, square_patch_grid, token_log_probs,
)
from .capabilities import Site
from .questions import HFQuestions

#: the probe sites of the image-grounded text encoder (``cross_*``: its cross-attention to the image tokens)
TEXT_SITES = ("resid", "mlp", "self_attn", "cross_attn", "self_head", "cross_head")
VISION_SITES = ("resid", "mlp", "self_attn", "self_head")


def is_hf_blip_vqa(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("vision_model", "text_encoder", "text_decoder", "decoder_start_token_id"))


def first_step_logits(
    model: nn.Module, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None,
    image_embeds: Tensor | None = None,
) -> Tensor:
    """Answer-decoder logits (B, vocab) of any ``BlipForQuestionAnswering`` after one step from
    ``decoder_start_token_id``: what the answer starts with (NOTICE's score). ``image_embeds`` skips the vision tower."""
    image = model.vision_model(pixel_values=pixel_values).last_hidden_state if image_embeds is None else image_embeds
    image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
    question = model.text_encoder(
        input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image, encoder_attention_mask=image_mask
    ).last_hidden_state
    start = torch.full((input_ids.shape[0], 1), model.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    out = model.text_decoder(input_ids=start, encoder_hidden_states=question, encoder_attention_mask=attention_mask)
    return out.logits[:, -1]


class HFBlipVQAAnswerer(HFQuestions, HFAnswerLayout):
    """Runs a ``BlipForQuestionAnswering`` on questions and answers, with bottlenecks placed by the M2IB fit, and
    probes it as NOTICE does.

    Probe towers: ``"text"``, the image-grounded text encoder (self-attention, cross-attention to the image tokens,
    feed-forward; post-LN, so a layer's output is the residual stream), and ``"vision"``, the vision tower. The
    decision logits are the answer decoder's vocabulary logits after one step from ``decoder_start_token_id``.
    """

    model_types = ("blip",)
    architectures = ("BlipForQuestionAnswering",)
    model_class = "BlipForQuestionAnswering"
    num_prefix_tokens = 1
    probe_towers: tuple[str, ...] = ("text", "vision")

    def __init__(self, model: nn.Module, processor: Any = None):
        if not is_hf_blip_vqa(model):
            raise TypeError(f"HFBlipVQAAnswerer wraps a transformers BlipForQuestionAnswering, got {type(model).__name__}")
        self.module, self.processor, self.config = model, processor, model.config

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_hf_blip_vqa(model)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return (*super().capabilities, "answer_attention", "probing")

    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        """Vision blocks for ``image``; the image-grounded text encoder's layers (not the decoder's) for ``text``."""
        return self.module.vision_model.encoder.layers if modality == "image" else self.module.text_encoder.encoder.layer

    def resolve_layer(self, modality: Modality, layer: int, name: str) -> int:
        tower = "the vision tower" if modality == "image" else "the text encoder"
        return resolve_layer(layer, self.num_layers(modality), name, tower)

    def answer_batch(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                     answer_mask: Tensor) -> AnswerBatch:
        questions, answers = real_tokens(input_ids, attention_mask, "input_ids"), real_tokens(answer_ids, answer_mask, "answer_ids")
        batch, width, longest = len(questions), max(map(len, questions)), max(map(len, answers))
        ids = input_ids.new_full((batch, width), self.config.text_config.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        targets = answer_ids.new_zeros(batch, longest)
        score_mask = torch.zeros(batch, longest, dtype=torch.bool, device=ids.device)
        for b, (question, answer) in enumerate(zip(questions, answers)):
            ids[b, :len(question)], mask[b, :len(question)] = question, 1
            targets[b, :len(answer)], score_mask[b, :len(answer)] = answer, True
        one_image_per_sample(pixel_values, batch)
        rows, cols = square_patch_grid(self.config, pixel_values)
        return AnswerBatch(
            inputs={"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask},
            positions={"image": torch.ones(batch, 1 + rows * cols, dtype=torch.bool, device=ids.device), "text": mask.bool()},
            image=ImageLayout.uniform(batch, 1, (rows, cols), tuple(pixel_values.shape[-2:]), ids.device),
            input_columns=[keep.bool().nonzero()[:, 0] for keep in attention_mask],
            prompt_columns=[torch.arange(len(q), device=ids.device) for q in questions],
            targets=targets, score_mask=score_mask,
        )

    def _questions(self, batch: AnswerBatch, copies: int) -> Tensor:
        """The image-grounded question encodings (B * copies, L, D), each sample's rows ``copies`` times."""
        inputs = {k: v.repeat_interleave(copies, dim=0) for k, v in batch.inputs.items()}
        image = inputs["image_embeds"] if "image_embeds" in inputs else self.module.vision_model(
            pixel_values=inputs["pixel_values"]).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.module.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state

    @torch.no_grad()
    def fit_inputs(self, modality: Modality, batch: AnswerBatch) -> AnswerBatch:
        """For the text fit, the vision tower's output once (nothing the text bottleneck changes reaches it)."""
        if modality == "image":
            return batch
        image = self.module.vision_model(pixel_values=batch.inputs["pixel_values"]).last_hidden_state
        inputs = {k: v for k, v in batch.inputs.items() if k != "pixel_values"}
        return dataclasses.replace(batch, inputs={**inputs, "image_embeds": image})

    def _decode(self, question: Tensor, decoder_ids: Tensor) -> Tensor:
        mask = torch.ones(question.shape[:-1], dtype=torch.long, device=question.device)
        return self.module.text_decoder(input_ids=decoder_ids, encoder_hidden_states=question, encoder_attention_mask=mask).logits

    def answer_log_likelihood(self, batch: AnswerBatch, copies: int = 1) -> Tensor:
        """(B * copies,) sum over real answer tokens of log_softmax(decoder logits)[answer]; the decoder of each sample
        reads its real question tokens only."""
        question = self._questions(batch, copies)
        start = self.module.decoder_start_token_id
        scores = []
        for b in range(batch.batch_size):
            answer = batch.targets[b][batch.score_mask[b]]
            length = int(batch.inputs["attention_mask"][b].sum())
            decoder_ids = torch.cat([answer.new_tensor([start]), answer[:-1]]).expand(copies, -1)
            logits = self._decode(question[b * copies:(b + 1) * copies, :length], decoder_ids)
            logp = token_log_probs(logits, answer.expand(copies, -1))
            scores.append(logp.sum(1))
        return torch.cat(scores)

    @torch.no_grad()
    def generate_answers(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         max_new_tokens: int = 16) -> tuple[Tensor, Tensor]:
        """Each sample's greedy answer from ``decoder_start_token_id``, up to [SEP] (not included)."""
        batch = self.answer_batch(pixel_values, input_ids, attention_mask, input_ids[:, :1], torch.ones_like(input_ids[:, :1]))
        question = self._questions(batch, 1)
        stop = {self.config.text_config.sep_token_id, self.config.text_config.eos_token_id} - {None}
        answers = []
        for b in range(len(input_ids)):
            tokens = [self.module.decoder_start_token_id]
            length = int(batch.inputs["attention_mask"][b].sum())
            for _ in range(max_new_tokens):
                logits = self._decode(question[b:b + 1, :length], input_ids.new_tensor([tokens]))
                token = int(logits[0, -1].argmax())
                if token in stop:
                    break
                tokens.append(token)
            answers.append(tokens[1:])
        ids, mask = pad_token_ids([list(map(int, answer)) for answer in answers], 0)
        return ids.to(input_ids.device), mask.to(input_ids.device)

    # ---------------------------------------------------------------- attention graph (rollout, Chefer)
    def attention_graph(self) -> list[tuple[nn.Module, str, str]]:
        """The vision tower's self-attention over the image tokens (CLS first); per text-encoder layer, the question's
        self-attention then its cross-attention to the image tokens; per decoder layer, the answer's causal
        self-attention then its cross-attention to the encoded question."""
        decoder = self.module.text_decoder.bert.encoder.layer
        return [
            *((layer.self_attn, "image", "image") for layer in self.blocks("image")),
            *(pair for layer in self.blocks("text") for pair in ((layer.attention.self, "question", "question"),
                                                                 (layer.crossattention.self, "question", "image"))),
            *(pair for layer in decoder for pair in ((layer.attention.self, "answer", "answer"),
                                                     (layer.crossattention.self, "answer", "question"))),
        ]

    def eager_attention(self) -> ContextManager[None]:
        """Nothing to switch: BLIP's attention modules always return their probabilities."""
        return contextlib.nullcontext()

    def attention_readout(self, batch: AnswerBatch) -> AttentionReadout:
        """The decoder's positions (position t predicts answer token t), the vision tokens after CLS, the question."""
        rows, cols = square_patch_grid(self.config, batch.inputs["pixel_values"])
        answer = torch.arange(int(batch.score_mask[0].sum()), device=batch.targets.device)
        return AttentionReadout("answer", answer, "image", torch.arange(1, 1 + rows * cols, device=answer.device),
                                (rows, cols), "question")

    # ---------------------------------------------------------------- probing
    def default_probe_tower(self, modality: Modality) -> str:
        """The text encoder, which every corruption reaches (NOTICE patches it)."""
        return "text"

    def probe_sites(self, tower: str) -> tuple[str, ...]:
        return VISION_SITES if tower == "vision" else TEXT_SITES

    def _probe_layers(self, tower: str) -> nn.ModuleList:
        return self.blocks("image" if tower == "vision" else "text")

    def probe_layers(self, tower: str) -> int:
        return len(self._probe_layers(tower))

    def probe_site(self, tower: str, name: str, layer: int) -> Site:
        block = self._probe_layers(tower)[layer]
        if name == "resid":
            return Site(block, "output")
        if tower == "vision":
            if name == "mlp":
                return Site(block.mlp, "output")
            if name in ("self_attn", "self_head"):
                attn = block.self_attn
                return Site(attn.projection, "input", attn.num_heads if name == "self_head" else None)
        else:
            if name == "mlp":  # the feed-forward output proper: before its residual add and LayerNorm
                return Site(block.output.dense, "output")
            if name in ("self_attn", "self_head", "cross_attn", "cross_head"):
                attention = block.attention if name.startswith("self") else block.crossattention
                heads = attention.self.num_attention_heads if name.endswith("head") else None
                return Site(attention.self, "output", heads)
        raise ValueError(f"site {name!r} is not one of the {tower} tower's {self.probe_sites(tower)}")

    def decision_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, modality: Modality) -> dict:
        return {"pixel_values": pixel_values[:1], "input_ids": input_ids[:1], "attention_mask": attention_mask[:1]}

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        """The first answer step's logits; the vision tower runs once (its output repeated) unless its own sites are
        patched."""
        expand = lambda t: t.expand(rows, *t.shape[1:])  # noqa: E731
        mask = inputs.get("attention_mask")
        mask = None if mask is None else expand(mask)
        if tower == "vision":
            return first_step_logits(self.module, expand(inputs["pixel_values"]), expand(inputs["input_ids"]), mask)
        image = expand(self.module.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state)
        return first_step_logits(self.module, None, expand(inputs["input_ids"]), mask, image_embeds=image)

    def pooled_position(self, tower: str, inputs: dict[str, Tensor]) -> int:
        raise ValueError(f"BLIP VQA's {tower} tower does not pool: use positions='each' or 'all'")

    def image_keys(self, tower: str, inputs: dict[str, Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """The vision tokens after CLS: the keys of the text encoder's cross-attention and of the vision tower."""
        rows, cols = self.patch_grid(inputs["pixel_values"])
        return torch.arange(1, 1 + rows * cols), (rows, cols)

    def head_attention(self, tower: str, inputs: dict[str, Tensor]) -> list[Tensor]:
        """The text encoder's cross-attention (question tokens over image tokens), or the vision tower's
        self-attention (BLIP's attention modules always return their probabilities)."""
        layers = self._probe_layers(tower)
        modules = [layer.self_attn for layer in layers] if tower == "vision" else [layer.crossattention.self for layer in layers]
        with torch.no_grad():
            return attention_probabilities(modules, lambda: self.decision_logits(inputs, 1, "vision"))
