"""What an adapter can do, as small protocols: an adapter states the capabilities it offers, loading checks that it
has every member of each (naming the missing ones, before any work), and each consumer asks for what it needs.

- ``towers``: what the M2IB engine needs (:class:`~m2ib_lightning.backbones.base.VisionLanguageBackbone`);
- ``preprocessing``: what dataset runs need to turn an image and a caption into inputs and to display them;
- ``attention``: what the attention methods (rollout, Chefer) need to read attention probabilities;
- ``answer_attention``: what they need to explain the answer of a VLM that answers (the attention graph of its
  token groups);
- ``answers``: what M2IB for answers needs from a VLM that answers questions (BLIP VQA, LLaVA, ...);
- ``questions``: what VQA attribution runs need besides (pictures and questions to inputs, answers to ids);
- ``probing``: what activation patching (NOTICE) needs: each layer's sites and the decision a patch is scored by.

An adapter without a ``capabilities`` attribute is taken to offer the capabilities whose members it has all of
(``towers`` if none): a half-written preprocessing is then refused by the run that needs it, with the names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ContextManager, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
from torch import Tensor, nn

from .base import AttentionReadout, Modality, TextEncoding, VisionLanguageBackbone


@runtime_checkable
class Preprocessing(Protocol):
    """Images and captions to model inputs, token names for exports, and the image back for display.

    ``image_geometry(image)`` (how the processor resized and cropped it) is optional: without it, maps stay at the
    model's input size and ground-truth masks must come at that size.
    """

    pad_token_id: int

    def image_inputs(self, image: Any) -> Tensor:
        """One PIL image as the model's (C, H, W) pixel values."""

    def text_inputs(self, text: str) -> TextEncoding:
        """One caption as token ids, cut to the model's limit."""

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's pieces of ``ids``, for exports."""

    def special_mask(self, ids: Sequence[int]) -> list[bool]:
        """True for the special tokens that displays leave out."""

    def display_image(self, pixel_values: Tensor) -> np.ndarray:
        """(C, H, W) model input -> (H, W, 3) uint8 picture."""


@runtime_checkable
class Attention(Protocol):
    """Each block's attention module, whose output in eager mode is (context, probabilities (B, heads, T, T))."""

    def attention_modules(self, modality: Modality) -> list[nn.Module]:
        """One module per block of the tower, in block order."""

    def eager_attention(self) -> ContextManager[None]:
        """A context in which attention runs eagerly (probabilities returned); the model's setting comes back after."""


@runtime_checkable
class AnswerAttention(Protocol):
    """The attention log p(answer) flows through, as a graph of token groups: what rollout and Chefer need to explain
    an answer. A decoder VLM has one group (``sequence``: image tokens, prompt and answer in its language model);
    BLIP VQA three (``image``, ``question``, ``answer``) joined by cross-attention."""

    def attention_graph(self) -> list[tuple[nn.Module, str, str]]:
        """Each attention module in the order ``answer_log_likelihood`` calls it, with the groups of its queries and
        its keys (one group: self-attention); in eager mode each returns (context, probabilities (1, heads,
        queries, keys)) for a batch of one sample."""

    def eager_attention(self) -> ContextManager[None]:
        """A context in which attention runs eagerly (probabilities returned); the model's setting comes back after."""

    def attention_readout(self, batch: Any) -> AttentionReadout:
        """Where one sample's (a batch of one) relevance is read: the rows that predict its answer, its image's cells
        and its prompt's tokens."""


@runtime_checkable
class Answers(Protocol):
    """What M2IB for answers needs from a VLM that answers questions (fusion or generative)."""

    module: nn.Module

    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        """The blocks whose outputs the image and text bottlenecks replace."""

    def num_layers(self, modality: Modality) -> int:
        """Number of those blocks."""

    def resolve_layer(self, modality: Modality, layer: int, name: str) -> int:
        """A block index (negative from the end); ValueError naming ``name`` where the bottleneck cannot go."""

    def answer_batch(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                     answer_mask: Tensor, **model_inputs: Tensor) -> Any:
        """Model inputs for (question, answer) pairs (an :class:`~m2ib_lightning.backbones.base.AnswerBatch`), with
        each tower's bottlenecked positions and where the image's lie on the picture; ``model_inputs``: what the
        family needs besides (Qwen2-VL's ``image_grid_thw``)."""

    def fit_inputs(self, modality: Modality, batch: Any) -> Any:
        """The batch for one fit's passes, what the fit cannot change computed once (e.g. the vision tower, for the
        text fit); the same numbers as ``batch``."""

    def bottleneck_tokens(self, modality: Modality, batch: Any, output: Tensor) -> Tensor:
        """A block's output as (B, T, D) rows of tokens, T as in ``batch.positions[modality]``."""

    def bottleneck_output(self, modality: Modality, batch: Any, tokens: Tensor) -> Tensor:
        """(B, K, T, D) tokens back as the block's output for the batch with each sample repeated K times."""

    def sample_inputs(self, inputs: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        """The front door's inputs (``pixel_values``, ``input_ids``, ...) of sample ``index`` alone."""

    def answer_log_likelihood(self, batch: Any, copies: int = 1) -> Tensor:
        """(B * copies,) log p(answer) under teacher forcing, each sample's rows repeated ``copies`` times."""

    def generate_answers(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         max_new_tokens: int, **model_inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The model's own greedy answers as (answer_ids, answer_mask)."""


@runtime_checkable
class Questions(Protocol):
    """What VQA attribution runs need besides ``answers``: a picture and a question to model inputs, answers to ids
    and back, batches of image inputs, and the picture and the question's words back for displays."""

    pad_token_id: int

    def question_inputs(self, image: Any, question: str) -> Any:
        """A :class:`~m2ib_lightning.backbones.questions.QuestionInputs`: image inputs, prompt ids, visible words."""

    def answer_inputs(self, answer: str) -> list[int]:
        """An answer's ids as the model writes it."""

    def answer_text(self, ids: Sequence[int]) -> str:
        """Answer ids back to text."""

    def join_inputs(self, images: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Several samples' image inputs as one batch's."""

    def sample_image(self, inputs: dict[str, Tensor], index: int) -> Tensor:
        """One sample's pixel values from a batch's image inputs, as ``display_image`` takes them."""

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's pieces of ``ids``, for exports."""

    def display_image(self, pixel_values: Tensor) -> np.ndarray:
        """One sample's pixel values -> (H, W, 3) uint8 picture."""


@dataclass(frozen=True)
class Site:
    """One layer's activation (N, T, D): ``module``'s output (its first element, if a tuple; ``where="output"``) or
    its first input (``"input"``). Head sites split D into ``heads`` equal slices: head h is dimensions
    [h*d, (h+1)*d) of the context vectors before the output projection, the only place one head's part is separable."""

    module: nn.Module
    where: Literal["output", "input"]
    heads: int | None = None  # for head sites: how many heads the last dimension holds
    #: the module sees its rows' tokens one after another, (N * T, D) (Qwen2-VL's vision transformer packs every
    #: image's patches in one sequence); the patching hooks show it as (N, T, D)
    packed: bool = False


@runtime_checkable
class Probing(Protocol):
    """What activation patching needs: the towers whose layers can be patched, each layer's sites, and the decision
    logits a patch is scored by. Tower names are the adapter's own (``"image"``, ``"text"``, ``"vision"``, ...)."""

    module: nn.Module
    probe_towers: tuple[str, ...]

    def default_probe_tower(self, modality: Modality) -> str:
        """The tower patched when ``modality`` is corrupted and no tower is named."""

    def probe_sites(self, tower: str) -> tuple[str, ...]:
        """The site names of ``tower`` (``resid``, ``mlp``, ``self_attn``, ``self_head``, ...)."""

    def probe_layers(self, tower: str) -> int:
        """How many layers ``tower`` has."""

    def probe_site(self, tower: str, name: str, layer: int) -> Site:
        """Where site ``name`` of ``layer`` lives in the model."""

    def decision_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, modality: Modality,
                        **model_inputs: Tensor) -> dict:
        """Sample 0 in the form ``decision_logits`` takes when ``modality`` is corrupted (a two-choice matcher takes
        the other modality's first two samples as its choices); ``model_inputs``: what else the family takes
        (Qwen2-VL's ``image_grid_thw``)."""

    def decision_logits(self, inputs: dict[str, Tensor], rows: int, tower: str) -> Tensor:
        """(rows, C) logits of one sample's inputs repeated ``rows`` times (each row patched on its own)."""

    def pooled_position(self, tower: str, inputs: dict[str, Tensor]) -> int:
        """The position the tower pools at (``positions="pooled"``); ValueError for a tower that does not pool."""

    def head_attention(self, tower: str, inputs: dict[str, Tensor]) -> list[Tensor]:
        """Per layer, the attention probabilities (1, heads, queries, keys) of the heads that ``tower``'s head sites
        split (cross-attention for a tower that has it), for one sample: what head overlays draw."""


CAPABILITIES: dict[str, type] = {
    "towers": VisionLanguageBackbone, "preprocessing": Preprocessing, "attention": Attention, "answers": Answers,
    "answer_attention": AnswerAttention, "questions": Questions, "probing": Probing,
}


class MissingCapabilityError(TypeError):
    """An adapter that lacks a capability it claims, or one that a consumer needs."""


def members(capability: str) -> list[str]:
    """The member names of a capability's protocol, in declaration order."""
    protocol = CAPABILITIES[capability]
    names = [*getattr(protocol, "__annotations__", {}), *(n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_"))]
    return list(dict.fromkeys(n for n in names if not n.startswith("_")))


def missing_members(adapter: Any, capability: str) -> list[str]:
    return [name for name in members(capability) if not _has(adapter, name)]


def _has(adapter: Any, name: str) -> bool:
    """A member, found without running it where possible: a property that needs a processor is still a member."""
    if inspect.getattr_static(adapter, name, _ABSENT) is not _ABSENT:
        return True
    try:  # a wrapper that forwards attributes (``__getattr__``)
        getattr(adapter, name)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - there, but it needs what this adapter was built without
        return True
    return True


_ABSENT = object()


def claimed(adapter: Any) -> tuple[str, ...]:
    """The capabilities an adapter states (``capabilities``), or, without that attribute, those it has every member
    of (at least ``towers``, so that an adapter with none is told what the engine needs)."""
    stated = getattr(adapter, "capabilities", None)
    if stated is not None:
        unknown = sorted(set(stated) - set(CAPABILITIES))
        if unknown:
            raise MissingCapabilityError(f"{type(adapter).__name__}.capabilities names unknown {unknown}; known: {list(CAPABILITIES)}")
        return tuple(stated)
    return tuple(c for c in CAPABILITIES if not missing_members(adapter, c)) or ("towers",)


def check_claims(adapter: Any) -> tuple[str, ...]:
    """Raise :class:`MissingCapabilityError` naming each member missing from a claimed capability; return the claims."""
    capabilities = claimed(adapter)
    gaps = {c: missing_members(adapter, c) for c in capabilities}
    gaps = {c: m for c, m in gaps.items() if m}
    if gaps:
        detail = "; ".join(f"{c}: {', '.join(m)}" for c, m in gaps.items())
        raise MissingCapabilityError(f"adapter {type(adapter).__name__} claims capabilities it does not implement (missing {detail})")
    return capabilities


def require(adapter: Any, capability: str, consumer: str) -> None:
    """Raise :class:`MissingCapabilityError` unless ``adapter`` has every member of ``capability``; ``consumer`` says who asks."""
    missing = missing_members(adapter, capability)
    if missing:
        raise MissingCapabilityError(
            f"{consumer} needs the adapter's {capability} capability: {type(adapter).__name__} has no {', '.join(missing)} "
            "(see docs/backbones.md)"
        )
    if capability not in claimed(adapter):
        raise MissingCapabilityError(
            f"{consumer} needs the adapter's {capability} capability, which this {type(adapter).__name__} does not offer"
            + (" (built without a processor: load it with from_pretrained)" if capability in ("preprocessing", "questions") else "")
        )

