"""Activation patching between a clean and a minimally corrupted input (NOTICE-style), on any probing adapter.

One run of the source input (clean when denoising, corrupted when noising)
fills a cache of the chosen site's activation in every layer; then every cell
(layer, position, head) is patched in its own row of a batched forward of the
base input, ``batch_size`` rows at a time. Hooks do the patching and are
removed on exit, also on errors; nothing of the model is changed.

Scores, from the decision logits at the answers (correct, incorrect):
P(correct) (softmax over all logits), LD = logit(correct) - logit(incorrect),
and the normalised effect: denoising (LD_patched - LD_corrupt) / (LD_clean -
LD_corrupt), noising (LD_clean - LD_patched) / (LD_clean - LD_corrupt). Either
way 0 means "this site does nothing" and 1 "this site alone carries the whole
decision". A pair whose |LD_clean - LD_corrupt| < ``min_gap`` is flagged: its
effect is NaN and means leave it out.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor

from ..engine import eval_mode
from ..backbones.capabilities import Probing
from .adapters import Site, as_probing_adapter

Direction = Literal["denoise", "noise"]
#: older name of CLIP's head site
SITE_ALIASES = {"head": "self_head"}


@dataclass(frozen=True)
class Cell:
    layer: int
    position: int | None  # None: every position at once
    head: int | None = None


@dataclass
class PatchingResult:
    """Scores of one clean/corrupted pair over every cell of one site.

    ``patched_prob``, ``patched_ld`` and ``effect`` have shape (layers, positions),
    (layers, positions, heads) for head sites with ``positions="each"``, (layers, heads)
    for head sites otherwise, and (layers, 1) for other sites otherwise.
    """

    effect: Tensor
    patched_ld: Tensor
    patched_prob: Tensor
    clean_ld: float
    corrupt_ld: float
    clean_prob: float
    corrupt_prob: float
    flagged: bool
    site: str
    direction: str
    tower: str = ""

    @property
    def prob_difference(self) -> Tensor:
        """P_patched(correct) - P_corrupt(correct), NOTICE's second score."""
        return self.patched_prob - self.corrupt_prob

    @property
    def ld_difference(self) -> Tensor:
        """LD_patched - LD_corrupt, NOTICE's third score."""
        return self.patched_ld - self.corrupt_ld


def _activation(output_or_args: Any) -> Tensor:
    return output_or_args[0] if isinstance(output_or_args, (tuple, list)) else output_or_args


@contextlib.contextmanager
def site_hooks(sites: list[Site], edit: Callable[[int, Tensor], None], rows: int = 1) -> Iterator[None]:
    """``edit(layer, activation)`` sees, and may change in place, each layer's site activation (N, T, D), ahead of
    every other hook on the module (transformers 5.x records hidden states, which LLaVA's projector reads, by
    hooks of its own: they see the patched activation). ``rows``: N of the forward, by which a packed site's
    (N * T, D) activation is shown as (N, T, D)."""
    handles = []

    def edited(site: Site, layer: int, activation: Tensor) -> Tensor:
        activation = activation.clone()
        edit(layer, activation.view(rows, -1, activation.shape[-1]) if site.packed else activation)
        return activation

    for layer, site in enumerate(sites):
        if site.where == "input":
            def pre(module, args, layer=layer, site=site):
                return (edited(site, layer, args[0]), *args[1:])

            handles.append(site.module.register_forward_pre_hook(pre, prepend=True))
        else:
            def post(module, args, output, layer=layer, site=site):
                activation = edited(site, layer, _activation(output))
                return (activation, *output[1:]) if isinstance(output, tuple) else activation

            handles.append(site.module.register_forward_hook(post, prepend=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_dict(x: Any) -> dict[str, Tensor]:
    """A processor's ``BatchEncoding`` or a dict as a plain dict of tensors."""
    if isinstance(x, Tensor):
        return {"pixel_values": x}
    return {k: v for k, v in dict(x).items() if isinstance(v, Tensor) and k != "token_type_ids"}


class ActivationPatching:
    """Causal mediation by activation patching on a BLIP VQA model, a CLIP, or any probing adapter.

    >>> probe = ActivationPatching(blip_vqa)
    >>> result = probe.run(clean, corrupt, answers=(yes_id, no_id), modality="image", site="cross_head")
    >>> clip_probe = ActivationPatching(clip)
    >>> result = clip_probe.run(clean_pixels, corrupt_pixels, choices=two_captions, modality="image", site="self_head")
    """

    def __init__(self, model: Any, *, batch_size: int = 64, min_gap: float = 1e-3):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.adapter: Probing = as_probing_adapter(model)
        self.model = self.adapter.module
        self.batch_size, self.min_gap = batch_size, min_gap

    # ------------------------------------------------------------------ runs
    def _scores(self, logits: Tensor, answers: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(P(correct), LD) of each row of decision logits."""
        correct, incorrect = answers
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 models score in float32
        return torch.softmax(logits, dim=-1)[:, correct], logits[:, correct] - logits[:, incorrect]

    def _cache(self, sites: list[Site], inputs: dict[str, Tensor], tower: str) -> dict[int, Tensor]:
        cache: dict[int, Tensor] = {}
        with site_hooks(sites, lambda layer, act: cache.__setitem__(layer, act[0].clone())):
            self.adapter.decision_logits(inputs, 1, tower)
        return cache

    def _patched(self, sites: list[Site], base: dict[str, Tensor], cache: dict[int, Tensor], cells: list[Cell],
                 tower: str, answers: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(P(correct), LD) of ``base`` with each cell patched from ``cache`` in its own batch row.

        Cells go in position order, so a batch whose cells all lie at or after position ``s`` can start there from
        the base run's key/value cache of the positions before (an adapter's ``decision_prefix``, for causal
        towers: a patch changes nothing before its position)."""
        order = sorted(range(len(cells)), key=lambda i: -1 if cells[i].position is None else cells[i].position)
        prefixes = getattr(self.adapter, "decision_prefix", None)
        probs = torch.empty(len(cells), dtype=torch.float64)
        lds = torch.empty(len(cells), dtype=torch.float64)
        for begin in range(0, len(cells), self.batch_size):
            rows = order[begin : begin + self.batch_size]
            chunk = [cells[i] for i in rows]
            first = chunk[0].position or 0
            prefix = prefixes(base, tower, first) if prefixes is not None and first > 0 else None
            offset = first if prefix is not None else 0
            by_layer: dict[int, list[tuple[int, Cell]]] = {}
            for row, cell in enumerate(chunk):
                by_layer.setdefault(cell.layer, []).append((row, cell))

            def edit(layer: int, act: Tensor) -> None:
                source = cache[layer]
                for row, cell in by_layer.get(layer, ()):
                    at, where = (slice(None), slice(None)) if cell.position is None else (cell.position - offset, cell.position)
                    if cell.head is None:
                        act[row, at] = source[where]
                    else:
                        width = act.shape[-1] // sites[layer].heads
                        dims = slice(cell.head * width, (cell.head + 1) * width)
                        act[row, at, dims] = source[where, dims]

            with site_hooks(sites, edit, rows=len(chunk)):
                logits = (self.adapter.decision_logits(base, len(chunk), tower) if prefix is None
                          else self.adapter.decision_logits_after(prefix, len(chunk)))
            p, ld = self._scores(logits, answers)
            probs[rows], lds[rows] = p.double().cpu(), ld.double().cpu()
        return probs, lds

    @staticmethod
    def _same(cache: dict[int, Tensor], base_cache: dict[int, Tensor], cell: Cell, heads: int | None) -> bool:
        where = slice(None) if cell.position is None else cell.position
        source, base = cache[cell.layer][where], base_cache[cell.layer][where]
        if cell.head is not None:
            width = source.shape[-1] // heads
            source = source[..., cell.head * width : (cell.head + 1) * width]
            base = base[..., cell.head * width : (cell.head + 1) * width]
        return torch.equal(source, base)

    # ------------------------------------------------------------------- api
    @torch.no_grad()
    def run(
        self,
        clean: Any,
        corrupt: Any,
        choices: Any = None,
        *,
        answers: tuple[int, int] | None = None,
        modality: Literal["image", "text"],
        site: str = "resid",
        positions: Literal["each", "all", "pooled"] = "each",
        direction: Direction = "denoise",
        tower: str | None = None,
    ) -> PatchingResult:
        """Patch every cell of ``site`` in ``tower`` and score it.

        BLIP VQA: ``clean`` / ``corrupt`` are what ``BlipProcessor`` returns (``pixel_values``,
        ``input_ids``, ``attention_mask``); ``modality`` says which of them differs; ``answers`` are the
        token ids (correct, incorrect) read from the decoder's first step; ``tower`` is ``"text"`` (the
        image-grounded text encoder, default: positions are the question's tokens, [CLS] and [SEP]
        included) or ``"vision"``.
        CLIP: ``clean`` / ``corrupt`` are the corrupted modality's input of one sample (pixels, or
        ``{"input_ids", "attention_mask"}``), ``choices`` the other modality's two candidates (the right
        one for ``clean`` first); the tower is the corrupted one.
        ``positions``: each position in turn, all at once, or the tower's ``pooled`` one (CLIP).
        """
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        if positions not in ("each", "all", "pooled"):
            raise ValueError(f"positions must be 'each', 'all' or 'pooled', got {positions!r}")
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
        tower = tower or self.adapter.default_probe_tower(modality)
        if tower not in self.adapter.probe_towers:
            raise ValueError(f"tower must be one of {self.adapter.probe_towers}, got {tower!r}")
        if site not in self.adapter.probe_sites(tower) and SITE_ALIASES.get(site) in self.adapter.probe_sites(tower):
            site = SITE_ALIASES[site]
        if site not in self.adapter.probe_sites(tower):
            raise ValueError(f"site must be one of {self.adapter.probe_sites(tower)} for the {tower} tower, got {site!r}")
        clean, corrupt, answers = self._inputs(clean, corrupt, choices, answers, modality)

        with eval_mode(self.model):
            layers = self.adapter.probe_layers(tower)
            sites = [self.adapter.probe_site(tower, site, layer) for layer in range(layers)]
            clean_prob, clean_ld = (v.item() for v in self._scores(self.adapter.decision_logits(clean, 1, tower), answers))
            corrupt_prob, corrupt_ld = (v.item() for v in self._scores(self.adapter.decision_logits(corrupt, 1, tower), answers))
            source, base = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
            cache, base_cache = self._cache(sites, source, tower), self._cache(sites, base, tower)
            tokens = cache[0].shape[0]
            wheres = {"each": list(range(tokens)), "all": [None]}.get(positions) or [self.adapter.pooled_position(tower, clean)]
            heads = sites[0].heads
            if heads is not None:
                cells = [Cell(layer, p, h) for layer in range(layers) for p in wheres for h in range(heads)]
                shape = (layers, tokens, heads) if positions == "each" else (layers, heads)
            else:
                cells = [Cell(layer, p) for layer in range(layers) for p in wheres]
                shape = (layers, tokens) if positions == "each" else (layers, 1)
            # a cell whose source and base activations are identical changes nothing: it keeps the base run's
            # scores exactly (and costs no forward)
            base_prob, base_ld = (corrupt_prob, corrupt_ld) if direction == "denoise" else (clean_prob, clean_ld)
            probs = torch.full((len(cells),), base_prob, dtype=torch.float64)
            lds = torch.full((len(cells),), base_ld, dtype=torch.float64)
            # so does a padding position of the text tower: no real token attends to it (exact 0, not rounding)
            mask = base.get("attention_mask") if tower == "text" else None
            padding = set() if mask is None or mask.shape[-1] != tokens else set((mask[0] == 0).nonzero()[:, 0].tolist())
            active = [i for i, cell in enumerate(cells)
                      if cell.position not in padding and not self._same(cache, base_cache, cell, heads)]
            if active:
                p, ld = self._patched(sites, base, cache, [cells[i] for i in active], tower, answers)
                probs[active], lds[active] = p, ld
            dtype = torch.promote_types(next(self.model.parameters()).dtype, torch.float32)

        gap = clean_ld - corrupt_ld
        flagged = not math.isfinite(gap) or abs(gap) < self.min_gap
        lds = lds.view(shape)  # the effect in float64 first: a skipped cell's LD is the base LD exactly, effect 0
        if flagged:
            effect = torch.full_like(lds, math.nan)
        elif direction == "denoise":
            effect = (lds - corrupt_ld) / gap
        else:
            effect = (clean_ld - lds) / gap
        patched_prob, patched_ld, effect = probs.view(shape).to(dtype), lds.to(dtype), effect.to(dtype)
        return PatchingResult(effect, patched_ld, patched_prob, clean_ld, corrupt_ld, clean_prob, corrupt_prob,
                              flagged, site, direction, tower)

    def _inputs(self, clean: Any, corrupt: Any, choices: Any, answers: tuple[int, int] | None, modality: str):
        """Both runs' inputs as dicts, checked; CLIP's candidates ride along under ``"choices"``."""
        clean, corrupt = _as_dict(clean), _as_dict(corrupt)
        key = "pixel_values" if modality == "image" else "input_ids"
        if key not in clean or key not in corrupt:
            raise ValueError(f"clean and corrupt must hold {key!r} when modality={modality!r}")
        samples = clean["input_ids" if "input_ids" in clean else key].shape[0]  # Qwen2-VL packs an image's patches
        if clean[key].shape != corrupt[key].shape or samples != 1:
            raise ValueError(
                f"clean and corrupt must be one sample of the same shape, got {tuple(clean[key].shape)} "
                f"and {tuple(corrupt[key].shape)} (text corruption must keep the token count)"
            )
        if modality == "text" and "attention_mask" not in clean:
            clean["attention_mask"] = corrupt["attention_mask"] = torch.ones_like(clean["input_ids"])
        if choices is not None:
            other = "text" if modality == "image" else "image"
            choices = _as_dict(choices)
            if other == "text" and "attention_mask" not in choices:
                choices["attention_mask"] = torch.ones_like(choices["input_ids"])
            count = choices["pixel_values" if other == "image" else "input_ids"].shape[0]
            if count != 2:
                raise ValueError("choices must hold exactly two candidates, the right one for the clean input first")
            clean, corrupt = {**clean, "choices": choices}, {**corrupt, "choices": choices}
            answers = answers or (0, 1)
        if answers is None:
            raise ValueError("answers=(correct_token_id, incorrect_token_id) is needed to score a VQA model")
        if modality == "image" and "input_ids" in clean and not torch.equal(clean["input_ids"], corrupt["input_ids"]):
            raise ValueError("modality='image' but clean and corrupt questions differ: corrupt one input at a time")
        if modality == "text" and "pixel_values" in clean and not torch.equal(clean["pixel_values"], corrupt["pixel_values"]):
            raise ValueError("modality='text' but clean and corrupt images differ: corrupt one input at a time")
        return clean, corrupt, (int(answers[0]), int(answers[1]))

