"""Activation patching between a clean and a minimally corrupted input (NOTICE-style), for CLIP dual encoders.

The decision is a two-choice match: for image corruption, one image against
caption A (right for the clean image) and caption B (right for the corrupted
one); for text corruption, one caption against image A and image B. Its logit
difference LD = logit(A) - logit(B) is read with the model's own logit scale.

One clean (and one corrupted) run fills a cache of every site's activation;
then every cell (layer, position, head) is patched in its own row of a batched
forward, ``batch_size`` rows at a time. Hooks do the patching and are removed
on exit, also on errors; nothing of the model is changed.

Sites of a CLIP encoder layer: ``resid`` (its output, the residual stream
after the layer), ``mlp`` (the MLP's output proper, before the residual add)
and ``head`` (one attention head's output before ``out_proj``, the only place
a head's contribution is separable).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.hf_clip import HFCLIPBackbone, projected_features
from ..engine import eval_mode

Site = Literal["resid", "mlp", "head"]
SITES: tuple[Site, ...] = ("resid", "mlp", "head")


@dataclass(frozen=True)
class Cell:
    layer: int
    position: int | None  # None: every position at once
    head: int | None = None


@dataclass
class PatchingResult:
    """Effects of one clean/corrupted pair; ``effect`` is NaN everywhere when the pair is flagged."""

    effect: Tensor  # (layers, positions) or (layers, heads), or (layers, positions, heads) for heads at each position
    patched_ld: Tensor  # same shape: the logit difference of each patched run
    clean_ld: float
    corrupt_ld: float
    flagged: bool  # |clean_ld - corrupt_ld| too small to divide by: left out of means
    site: Site
    direction: str


def _inputs(x: Tensor | dict[str, Tensor], modality: str) -> dict[str, Tensor]:
    """Keyword inputs of one tower; text without a mask gets an all-ones one."""
    if modality == "image":
        return {"pixel_values": x["pixel_values"] if isinstance(x, dict) else x}
    ids = x["input_ids"] if isinstance(x, dict) else x
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}


def _layers(model: nn.Module, modality: str) -> nn.ModuleList:
    return (model.vision_model if modality == "image" else model.text_model).encoder.layers


def _site_module(block: nn.Module, site: Site) -> nn.Module:
    return {"resid": block, "mlp": block.mlp, "head": block.self_attn.out_proj}[site]


@contextlib.contextmanager
def _hooks(model: nn.Module, modality: str, site: Site, edit) -> Iterator[None]:
    """``edit(layer, activation)`` sees (and may change in place) each layer's site activation (N, T, D)."""
    handles = []
    for layer, block in enumerate(_layers(model, modality)):
        module = _site_module(block, site)
        if site == "head":
            def pre(mod, args, layer=layer):
                activation = args[0].clone()
                edit(layer, activation)
                return (activation, *args[1:])

            handles.append(module.register_forward_pre_hook(pre))
        else:
            def post(mod, args, output, layer=layer):
                tensor = output[0] if isinstance(output, tuple) else output
                activation = tensor.clone()
                edit(layer, activation)
                return (activation, *output[1:]) if isinstance(output, tuple) else activation

            handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ActivationPatching:
    """Causal mediation by activation patching on a ``transformers.CLIPModel``.

    >>> probe = ActivationPatching(clip)
    >>> result = probe.run(clean_pixels, corrupt_pixels, choices={"input_ids": ids, "attention_mask": mask},
    ...                    modality="image", site="head", positions="all")
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 64, min_gap: float = 1e-3):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.min_gap = model, batch_size, min_gap

    # ------------------------------------------------------------------ runs
    def _embed(self, modality: str, inputs: dict[str, Tensor]) -> Tensor:
        if modality == "image":
            return projected_features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        return projected_features(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )

    def _logit_difference(self, embedding: Tensor, choices: Tensor) -> Tensor:
        scale = self.model.logit_scale.exp()
        logits = scale * F.normalize(embedding, dim=-1) @ F.normalize(choices, dim=-1).t()
        return logits[:, 0] - logits[:, 1]

    def _cache(self, modality: str, inputs: dict[str, Tensor], site: Site) -> dict[int, Tensor]:
        cache: dict[int, Tensor] = {}
        with _hooks(self.model, modality, site, lambda layer, act: cache.__setitem__(layer, act[0].clone())):
            self._embed(modality, inputs)
        return cache

    def _patched(self, modality: str, base: dict[str, Tensor], cache: dict[int, Tensor], cells: list[Cell],
                 site: Site, choices: Tensor) -> Tensor:
        """LD of ``base`` with each cell patched from ``cache`` in its own batch row."""
        heads = _layers(self.model, modality)[0].self_attn.num_heads
        out = []
        for start in range(0, len(cells), self.batch_size):
            chunk = cells[start : start + self.batch_size]
            by_layer: dict[int, list[tuple[int, Cell]]] = {}
            for row, cell in enumerate(chunk):
                by_layer.setdefault(cell.layer, []).append((row, cell))

            def edit(layer: int, act: Tensor) -> None:
                for row, cell in by_layer.get(layer, ()):
                    where = slice(None) if cell.position is None else cell.position
                    if cell.head is None:
                        act[row, where] = cache[layer][where]
                    else:
                        split = act.view(*act.shape[:2], heads, -1)
                        split[row, where, cell.head] = cache[layer].view(act.shape[1], heads, -1)[where, cell.head]

            rows = {k: v.expand(len(chunk), *v.shape[1:]) for k, v in base.items()}
            with _hooks(self.model, modality, site, edit):
                out.append(self._logit_difference(self._embed(modality, rows), choices))
        return torch.cat(out)

    def _pooled_position(self, modality: str, inputs: dict[str, Tensor]) -> int:
        """The token the tower pools into its embedding: CLS for images, EOS (HF's rule) for text."""
        if modality == "image":
            return 0
        return int(HFCLIPBackbone(self.model).pool_index(inputs["input_ids"])[0])

    # ------------------------------------------------------------------- api
    @torch.no_grad()
    def run(
        self,
        clean: Tensor | dict[str, Tensor],
        corrupt: Tensor | dict[str, Tensor],
        choices: Tensor | dict[str, Tensor],
        *,
        modality: Literal["image", "text"],
        site: Site = "resid",
        positions: Literal["each", "all", "pooled"] = "each",
        direction: Literal["denoise", "noise"] = "denoise",
    ) -> PatchingResult:
        """Patch every cell of ``site`` and return the normalised effects.

        ``clean``/``corrupt``: the corrupted modality's input of one sample (pixels (1, 3, H, W), or
        ``{"input_ids", "attention_mask"}`` of shape (1, L), the same length in both); ``positions``: each
        token in turn, all at once, or only the ``pooled`` one (CLS / EOS); ``choices``: the
        other modality's two candidates, the right one for ``clean`` first. ``denoise`` patches clean
        activations into the corrupted run, ``noise`` corrupted ones into the clean run; either way the
        effect is (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt).
        """
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        if positions not in ("each", "all", "pooled"):
            raise ValueError(f"positions must be 'each', 'all' or 'pooled', got {positions!r}")
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
        key = "pixel_values" if modality == "image" else "input_ids"
        choice_modality = "text" if modality == "image" else "image"
        clean, corrupt = _inputs(clean, modality), _inputs(corrupt, modality)
        choices = _inputs(choices, choice_modality)
        if clean[key].shape != corrupt[key].shape or clean[key].shape[0] != 1:
            raise ValueError(
                f"clean and corrupt must be one sample of the same shape, got {tuple(clean[key].shape)} "
                f"and {tuple(corrupt[key].shape)} (text corruption must keep the token count)"
            )
        if choices["pixel_values" if choice_modality == "image" else "input_ids"].shape[0] != 2:
            raise ValueError("choices must hold exactly two candidates, the right one for the clean input first")

        with eval_mode(self.model):
            targets = self._embed(choice_modality, choices)
            clean_ld = self._logit_difference(self._embed(modality, clean), targets).item()
            corrupt_ld = self._logit_difference(self._embed(modality, corrupt), targets).item()
            source, base = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
            cache = self._cache(modality, source, site)
            layers = len(_layers(self.model, modality))
            tokens = clean[key].shape[1] if modality == "text" else next(iter(cache.values())).shape[0]
            heads = _layers(self.model, modality)[0].self_attn.num_heads
            wheres = {"each": list(range(tokens)), "all": [None], "pooled": [self._pooled_position(modality, clean)]}
            wheres = wheres[positions]
            if site == "head":
                cells = [Cell(l, p, h) for l in range(layers) for p in wheres for h in range(heads)]
                shape = (layers, tokens, heads) if positions == "each" else (layers, heads)
            else:
                cells = [Cell(l, p) for l in range(layers) for p in wheres]
                shape = (layers, tokens) if positions == "each" else (layers, 1)
            patched = self._patched(modality, base, cache, cells, site, targets).view(shape)

        gap = clean_ld - corrupt_ld
        flagged = abs(gap) < self.min_gap
        effect = torch.full_like(patched, math.nan) if flagged else (patched - corrupt_ld) / gap
        return PatchingResult(effect, patched, clean_ld, corrupt_ld, flagged, site, direction)


def mean_effect(results: list[PatchingResult]) -> tuple[Tensor, Tensor]:
    """Mean over the unflagged samples, and the raw (samples, ...) stack with NaN for flagged ones.

    Samples of different token counts are NaN-padded along positions; the mean skips the padding.
    """
    width = max(r.effect.shape[1] for r in results)
    stack = torch.stack([F.pad(r.effect, (0, 0) * (r.effect.dim() - 2) + (0, width - r.effect.shape[1]), value=math.nan)
                         if r.effect.shape[1] < width else r.effect for r in results])
    kept = stack[[not r.flagged for r in results]]
    if not len(kept):
        raise ValueError("every sample is flagged (clean and corrupted logit differences too close)")
    return kept.nanmean(0), stack


def important_heads(mean_abs_effect: Tensor, num_std: float = 2.0) -> list[tuple[int, int]]:
    """(layer, head) whose mean |effect| is at least the mean plus ``num_std`` standard deviations over all heads."""
    if mean_abs_effect.dim() != 2:
        raise ValueError(f"mean_abs_effect must be (layers, heads), got {tuple(mean_abs_effect.shape)}")
    threshold = mean_abs_effect.mean() + num_std * mean_abs_effect.std()
    return [tuple(idx) for idx in (mean_abs_effect >= threshold).nonzero().tolist()]


def same_length_replacement(tokenizer, text: str, word: str, candidates: list[str]) -> str:
    """``text`` with ``word`` replaced by the first candidate of the same token count (symmetric token replacement)."""
    if f" {word} " not in f" {text} ":
        raise ValueError(f"{word!r} is not a word of {text!r}")
    length = len(tokenizer(text)["input_ids"])
    for candidate in candidates:
        replaced = f" {text} ".replace(f" {word} ", f" {candidate} ", 1).strip()
        if candidate != word and len(tokenizer(replaced)["input_ids"]) == length:
            return replaced
    raise ValueError(f"no candidate for {word!r} in {candidates} keeps the {length} tokens of {text!r}")
