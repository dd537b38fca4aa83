"""Attribution methods to compare M2IB with, through the backbone adapter protocol (any shipped backbone).

Every method explains the same score, the cosine similarity between the image's and
the caption's embeddings (``backbone.embed``), or, for a VLM that answers questions,
log p(answer) under teacher forcing (:class:`AnswerScorer`), and returns :class:`Maps` of M2IB's
shapes: an image map (B, H, W) and, where the method has one, a text map (B, L), each
min-maxed to [0, 1] (text over the caption's real tokens, 0 at padding). One class per
method with one ``attribute`` call, as in Captum; Captum does the gradient methods where
its API fits. A method is picked by name from :data:`METHODS` (``register_method`` adds one).

Methods touch the model only through hooks, removed also on errors, and leave its
weights, gradients and train/eval flags as they were.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import as_backbone
from .backbones.base import block_output, resolve_layer, tower_inputs
from .backbones.capabilities import claimed, require
from .engine import M2IB, M2IBConfig, eval_mode, image_maps_from_capacity, minmax
from .registry import Registry


@dataclass
class Maps:
    """A method's maps for a batch: image (B, H, W) and text (B, L) or None, each in [0, 1]."""

    image: Tensor
    text: Tensor | None = None


METHODS: Registry[type["AttributionMethod"]] = Registry("attribution method")


def register_method(cls: type["AttributionMethod"] | None = None, *, overwrite: bool = False) -> Any:
    """Class decorator: make a method available by its ``name`` (in configs: ``methods: [...]``); a taken name
    is refused unless ``@register_method(overwrite=True)``."""
    if cls is None:
        return lambda method: register_method(method, overwrite=overwrite)
    return METHODS.register(cls.name, cls, overwrite=overwrite)


def make_method(name: str, backbone: Any, **settings: Any) -> "AttributionMethod":
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; registered: {sorted(METHODS)}")
    return METHODS.create(name, backbone, **settings)


@contextlib.contextmanager
def _hooked(module: torch.nn.Module, *, pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
    handles = []
    try:
        if pre is not None:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            handles.append(module.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _leaf(pixel_values: Tensor) -> Tensor:
    """Pixels as a leaf that requires gradients, as Captum wants its inputs (the caller's tensor is left alone)."""
    return pixel_values.detach().clone().requires_grad_()


def _replace_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    """A block's inputs with its hidden states (first positional or ``hidden_states``) replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


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

    def log_p(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(rows,) log p(bound answer), the answers repeated to the rows of ``input_ids``."""
        ids, mask = self._bound()
        copies = input_ids.shape[0] // ids.shape[0]
        batch = self.backbone.answer_batch(pixel_values, input_ids, attention_mask, ids.repeat_interleave(copies, 0),
                                           mask.repeat_interleave(copies, 0))
        return self.backbone.answer_log_likelihood(batch)

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


class AttributionMethod:
    """A method's common frame: the adapter, the score (:func:`scorer_of`), and eval mode with gradients on during
    ``attribute``."""

    name: ClassVar[str] = "method"
    has_text_map: ClassVar[bool] = False

    def __init__(self, backbone: Any, **settings: Any):
        self.scorer = scorer_of(backbone)
        self.backbone = self.scorer.backbone
        if settings:
            raise TypeError(f"method {self.name!r} takes no settings {sorted(settings)}")

    def image_score(self, input_ids: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        return self.scorer.image_score(input_ids, attention_mask)

    def text_score(self, pixel_values: Tensor, attention_mask: Tensor) -> Callable[[Tensor], Tensor]:
        return self.scorer.text_score(pixel_values, attention_mask)

    def attribute(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor, special: Tensor | None = None,
        answers: tuple[Tensor, Tensor] | None = None,
    ) -> Maps:
        """Maps for a batch. ``seeds`` (B,) seed the methods that draw random numbers, per sample; ``special``
        (B, L) marks BOS/EOS/CLS/SEP/padding (default: the adapter's ``special_mask``; for a question, every token
        that is not one of its words); ``answers`` (answer_ids, answer_mask), for a VLM that answers."""
        if answers is not None:
            self.scorer.bind(*answers)
        if special is None:
            special = special_tokens(self.backbone, input_ids)
        self.words = attention_mask.bool() & ~special.to(attention_mask.device)
        with eval_mode(self.backbone.module), torch.enable_grad():
            maps = self._maps(pixel_values, input_ids, attention_mask, seeds)
        return Maps(maps.image.detach(), None if maps.text is None else maps.text.detach())

    def _maps(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor) -> Maps:
        """The method itself; ``self.words`` (B, L) marks the caption's words (real tokens, not special)."""
        raise NotImplementedError

    def token_map(self, tokens: Tensor, pixel_values: Tensor) -> Tensor:
        """Per-token values of the image tower (B, T) -> image map (B, H, W) through the patch grid."""
        patches = tokens[:, self.backbone.num_prefix_tokens:]
        return image_maps_from_capacity(patches, self.backbone.patch_grid(pixel_values), tuple(pixel_values.shape[-2:]))


@register_method
class M2IBMethod(AttributionMethod):
    """M2IB itself (both maps); ``settings`` are :class:`~m2ib_lightning.engine.M2IBConfig`'s."""

    name = "m2ib"
    has_text_map = True

    def __init__(self, backbone: Any, **settings: Any):
        AttributionMethod.__init__(self, backbone)
        self.config = M2IBConfig(**settings)
        self.explainer = None if isinstance(self.scorer, AnswerScorer) else M2IB(self.backbone, self.config)

    def attribute(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor, special: Tensor | None = None,
        answers: tuple[Tensor, Tensor] | None = None,
    ) -> Maps:
        if self.explainer is None:  # a VLM that answers: the fit term is log p(answer)
            from .answers import attribute_answers

            if answers is not None:
                self.scorer.bind(*answers)
            result = attribute_answers(self.backbone, pixel_values, input_ids, attention_mask, *self.scorer._bound(),
                                       config=self.config, seed=seeds)
            return Maps(result.image_maps, result.text_maps)
        result = self.explainer.attribute(pixel_values, input_ids, attention_mask, seed=seeds)
        return Maps(result.image_maps, result.text_maps)


@register_method
class GradientSaliency(AttributionMethod):
    """|d score / d pixel| summed over channels (Simonyan et al., 2014; Captum ``Saliency``)."""

    name = "saliency"

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        from captum.attr import Saliency

        score = self.image_score(input_ids, attention_mask)
        return Maps(minmax(Saliency(score).attribute(_leaf(pixel_values), abs=True).sum(1)))


@register_method
class IntegratedGradientsMethod(AttributionMethod):
    """Integrated gradients (Sundararajan et al., 2017). Image: on pixels from the zero image (the mean colour after
    normalisation; Captum ``IntegratedGradients``). Text: on the token embeddings entering the first text block, from
    the caption with its words replaced by ``replacement_id`` (BOS/EOS kept). |attribution| summed over channels."""

    name = "integrated_gradients"
    has_text_map = True

    def __init__(self, backbone: Any, steps: int = 16, replacement_id: int | None = None):
        super().__init__(backbone)
        self.steps, self.replacement_id = steps, replacement_id

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        from captum.attr import IntegratedGradients

        image = IntegratedGradients(self.image_score(input_ids, attention_mask)).attribute(
            _leaf(pixel_values), baselines=torch.zeros_like(pixel_values), n_steps=self.steps, internal_batch_size=pixel_values.shape[0]
        )
        return Maps(minmax(image.abs().sum(1)), self._text(pixel_values, input_ids, attention_mask))

    def _text(self, pixel_values, input_ids, attention_mask) -> Tensor:
        score = self.text_score(pixel_values, attention_mask)
        block = self.backbone.blocks("text")[0]
        words = self.words
        replacement = replacement_token(self.backbone, self.replacement_id)
        baseline_ids = input_ids.masked_fill(words, replacement)
        captured: dict[str, Tensor] = {}

        def capture(module, args, kwargs):
            captured["hidden"] = _block_input(args, kwargs).detach()

        with _hooked(block, pre=capture), torch.no_grad():
            score(baseline_ids)
            start = captured["hidden"]
            score(input_ids)
            end = captured["hidden"]
        alphas = (torch.arange(self.steps, dtype=end.dtype, device=end.device) + 0.5) / self.steps  # midpoint rule
        path = (start[:, None] + alphas[None, :, None, None] * (end - start)[:, None]).flatten(0, 1).requires_grad_()

        def interpolate(module, args, kwargs):
            return _replace_hidden(args, kwargs, path)

        with _hooked(block, pre=interpolate):
            scores = score(input_ids.repeat_interleave(self.steps, dim=0))
        (grads,) = torch.autograd.grad(scores.sum(), [path])
        attribution = ((end - start) * grads.view(*end.shape[:1], self.steps, *end.shape[1:]).mean(1)).sum(-1).abs()
        return minmax(self.scorer.text_columns(attribution, pixel_values, input_ids, attention_mask), attention_mask.bool())


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


@register_method
class GradXActivation(AttributionMethod):
    """Gradient x activation (Shrikumar et al., 2016). Image: on the tokens leaving vision block ``layer`` (default the penultimate: after the last block only the pooled token reaches the score; Captum
    ``LayerGradientXActivation``), summed over channels, ReLU, per patch. Text: gradient x token embedding entering
    the first text block, |summed over channels|."""

    name = "grad_x_activation"
    has_text_map = True

    def __init__(self, backbone: Any, layer: int = -2):
        super().__init__(backbone)
        self.layer = layer

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        from captum.attr import LayerGradientXActivation

        block = self.backbone.blocks("image")[self.layer]
        tokens = LayerGradientXActivation(self.image_score(input_ids, attention_mask), block).attribute(_leaf(pixel_values))
        image = self.token_map(block_output(tokens).sum(-1).clamp_min(0), pixel_values)
        return Maps(image, self._text(pixel_values, input_ids, attention_mask))

    def _text(self, pixel_values, input_ids, attention_mask) -> Tensor:
        score = self.text_score(pixel_values, attention_mask)
        captured: dict[str, Tensor] = {}

        def leaf(module, args, kwargs):
            captured["hidden"] = _block_input(args, kwargs).detach().requires_grad_()
            return _replace_hidden(args, kwargs, captured["hidden"])

        with _hooked(self.backbone.blocks("text")[0], pre=leaf):
            scores = score(input_ids)
        hidden = captured["hidden"]
        (grads,) = torch.autograd.grad(scores.sum(), [hidden])
        attribution = (grads * hidden).sum(-1).abs()
        return minmax(self.scorer.text_columns(attribution, pixel_values, input_ids, attention_mask), attention_mask.bool())


@register_method
class GradCAM(AttributionMethod):
    """Grad-CAM (Selvaraju et al., 2017) on the patch tokens leaving vision block ``layer`` (default the penultimate): channel weights are the
    gradients averaged over patches, the map is ReLU(sum_c w_c A_tc). Written out because Captum's ``LayerGradCam``
    takes channels at dimension 1 (CNN layout), where a ViT block has tokens."""

    name = "grad_cam"

    def __init__(self, backbone: Any, layer: int = -2):
        super().__init__(backbone)
        self.layer = layer

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        score = self.image_score(input_ids, attention_mask)
        captured: dict[str, Tensor] = {}

        def keep(module, args, output):
            captured["tokens"] = block_output(output)

        with _hooked(self.backbone.blocks("image")[self.layer], post=keep):
            scores = score(_leaf(pixel_values))  # a leaf: a frozen model (requires_grad off) still has a graph
        tokens = captured["tokens"]
        (grads,) = torch.autograd.grad(scores.sum(), [tokens])
        prefix = self.backbone.num_prefix_tokens
        weights = grads[:, prefix:].mean(1, keepdim=True)
        cam = (weights * tokens[:, prefix:]).sum(-1).clamp_min(0)
        return Maps(image_maps_from_capacity(cam, self.backbone.patch_grid(pixel_values), tuple(pixel_values.shape[-2:])))


@register_method
class RISE(AttributionMethod):
    """RISE (Petsiuk et al., 2018): the score-weighted mean of ``masks`` random masks (cells of a ``cells`` x ``cells``
    grid kept with probability ``keep``, upsampled bilinearly with a random shift), drawn from each sample's seed and
    scored ``chunk`` at a time. The map is sum_i s_i M_i / (N p)."""

    name = "rise"

    def __init__(self, backbone: Any, masks: int = 500, cells: int = 7, keep: float = 0.5, chunk: int = 100):
        super().__init__(backbone)
        self.masks, self.cells, self.keep, self.chunk = masks, cells, keep, chunk

    def random_masks(self, seed: int, height: int, width: int, device: torch.device) -> Tensor:
        gen = torch.Generator().manual_seed(int(seed))
        grid = (torch.rand(self.masks, 1, self.cells, self.cells, generator=gen) < self.keep).float()
        cell_h, cell_w = -(-height // self.cells), -(-width // self.cells)
        big = F.interpolate(grid, size=((self.cells + 1) * cell_h, (self.cells + 1) * cell_w), mode="bilinear", align_corners=False)
        dy = torch.randint(0, cell_h, (self.masks,), generator=gen)
        dx = torch.randint(0, cell_w, (self.masks,), generator=gen)
        return torch.stack([big[i, 0, dy[i]: dy[i] + height, dx[i]: dx[i] + width] for i in range(self.masks)]).to(device)

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        height, width = pixel_values.shape[-2:]
        out = []
        for b in range(pixel_values.shape[0]):
            score = self.image_score(input_ids[b: b + 1], attention_mask[b: b + 1])
            masks = self.random_masks(int(seeds[b]), height, width, pixel_values.device)
            total = torch.zeros(height, width, device=pixel_values.device)
            with torch.no_grad(), self.scorer.only(b):
                for start in range(0, self.masks, self.chunk):
                    chunk = masks[start: start + self.chunk]
                    scores = self.scorer.confidence(score(pixel_values[b: b + 1] * chunk[:, None].to(pixel_values.dtype)))
                    total += (scores[:, None, None].float() * chunk).sum(0)
            out.append(total / (self.masks * self.keep))
        return Maps(minmax(torch.stack(out)))


class _AttentionMethod(AttributionMethod):
    """Methods that read each block's attention probabilities (eager attention, through the adapter's
    ``attention_modules`` and ``eager_attention``). Relevance flows from the position each tower pools (CLS, EOS;
    the mean over tokens for an attention-pooling head) to its tokens."""

    has_text_map = True
    needs_gradients = False

    def __init__(self, backbone: Any, **settings: Any):
        super().__init__(backbone, **settings)
        require(self.backbone, "attention", f"the {self.name} method")

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        image = self._relevance("image", pixel_values, input_ids, attention_mask)
        text = self._relevance("text", pixel_values, input_ids, attention_mask)
        return Maps(self.token_map(image, pixel_values), minmax(text, attention_mask.bool()))

    def _relevance(self, modality, pixel_values, input_ids, attention_mask) -> Tensor:
        """(B, T) relevance of each token of one tower for its pooled embedding."""
        probs: list[Tensor] = []

        def keep(module, args, output):
            probs.append(output[1])

        inputs = tower_inputs(modality, pixel_values, input_ids, attention_mask)
        score = (self.image_score(input_ids, attention_mask) if modality == "image"
                 else self.text_score(pixel_values, attention_mask))
        argument = pixel_values if modality == "image" else input_ids
        def into_graph(module, args, kwargs):  # a frozen model (requires_grad off) builds no graph of its own
            hidden = _block_input(args, kwargs)
            return None if hidden.requires_grad else _replace_hidden(args, kwargs, hidden.detach().requires_grad_())

        with contextlib.ExitStack() as stack:
            stack.enter_context(self.backbone.eager_attention())
            if self.needs_gradients:
                stack.enter_context(_hooked(self.backbone.blocks(modality)[0], pre=into_graph))
            for module in self.backbone.attention_modules(modality):
                stack.enter_context(_hooked(module, post=keep))
            with torch.set_grad_enabled(self.needs_gradients):
                scores = score(argument)
        if any(p is None for p in probs):
            raise RuntimeError(f"{self.name}: the model returned no attention probabilities (transformers 5 is needed)")
        grads = torch.autograd.grad(scores.sum(), probs) if self.needs_gradients else [None] * len(probs)
        tokens = probs[0].shape[-1]
        relevance = torch.eye(tokens, dtype=probs[0].dtype, device=probs[0].device).expand(probs[0].shape[0], tokens, tokens)
        first = self.first_block(modality)
        for attention, grad in list(zip(probs, grads))[first:]:
            relevance = self._step(relevance, attention.detach(), None if grad is None else grad.detach())
        state = self.backbone.prefix(modality, inputs, 0)
        if state.pool_index is None:  # attention-pooling head: every token feeds the embedding
            return relevance.mean(1)
        return relevance[torch.arange(relevance.shape[0], device=relevance.device), state.pool_index]

    def first_block(self, modality: str) -> int:
        """The first block whose attention enters the relevance (every block, unless a method says otherwise)."""
        return 0

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        raise NotImplementedError


@register_method
class AttentionRollout(_AttentionMethod):
    """Attention rollout (Abnar & Zuidema, 2020): per block the head-mean attention with the residual added,
    0.5 A + 0.5 I, rows renormalised, multiplied through the tower."""

    name = "rollout"

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        mixed = 0.5 * attention.mean(1) + 0.5 * torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
        return (mixed / mixed.sum(-1, keepdim=True)) @ relevance


@register_method
class CheferRelevance(_AttentionMethod):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021) for dual encoders: per block from
    ``start_layer`` on, R <- R + E_heads[(dS/dA * A)^+] R, from R = I; the row of the pooled token is the map.
    ``start_layer=0`` takes every block; the official CLIP explainer of Chefer et al. uses the last block only
    (``start_layer=-1``)."""

    name = "chefer"
    needs_gradients = True

    def __init__(self, backbone: Any, start_layer: int = 0):
        super().__init__(backbone)
        self.start_layer = start_layer

    def first_block(self, modality: str) -> int:
        return resolve_layer(self.start_layer, self.backbone.num_layers(modality), "start_layer", f"the {modality} tower")

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        weighted = (grad * attention).clamp_min(0).mean(1)
        return relevance + weighted @ relevance


@register_method
class RandomMap(AttributionMethod):
    """Uniform noise from each sample's seed, for both maps: the floor every method must beat."""

    name = "random"
    has_text_map = True

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
        image = random_image_maps(gens, tuple(pixel_values.shape[-2:])).to(pixel_values.device)
        text = torch.stack([torch.rand(input_ids.shape[1], generator=g) for g in gens]).to(pixel_values.device)
        return Maps(image, minmax(text, attention_mask.bool()))


def random_image_maps(generators: list[torch.Generator], size: tuple[int, int]) -> Tensor:
    """(B, H, W) uniform noise, one map from each sample's generator: the random baseline of every table."""
    return torch.stack([torch.rand(size, generator=g) for g in generators])
