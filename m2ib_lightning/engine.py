"""The M2IB attribution engine: pure torch, no Lightning.

For every image-text pair two bottlenecks are fitted, one in each tower, on
the output of encoder block ``layer``. The fit of a whole batch runs at once:
alpha has shape (B, T, D) and the batch loss is the *sum* of per-sample
losses, so every sample's gradient (and Adam's elementwise update) equals its
solo run. Each sample draws its noise from its own generator, so its maps do
not depend on its batch-mates, the batch size or the number of devices.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import MODALITIES, Modality, TowerState, VisionLanguageBackbone, as_backbone, resolve_layer
from .backbones.base import other, tower_inputs
from .backbones.capabilities import claimed
from .bottleneck import INITIAL_ALPHA, capacity, masked_moments, sample

Seeds = int | Sequence[int] | Tensor


@dataclass(frozen=True)
class M2IBConfig:
    """Hyper-parameters of the fit; the defaults are the reference's."""

    vision_layer: int = 9  # negative: counted from the last block (-1)
    text_layer: int = 9
    beta: float = 0.1
    steps: int = 10
    lr: float = 1.0
    num_noise: int = 10
    #: Fit each sample on its own (same shapes as a solo run), so that its maps are bitwise the same
    #: whatever its batch-mates, batch size or device count. False fits the batch at once: faster on
    #: GPUs, equal in exact arithmetic, but float32 rounding then differs with the batch (~1e-6 on maps).
    batch_invariant: bool = True
    #: Where the noise is drawn: "cpu" (per-sample CPU generators; the stream of the official code and of
    #: every device) or "auto" (per-sample generators on the fitting device: no host-to-device copy each
    #: step on GPUs; on a GPU its maps differ from the CPU stream's, on a CPU they are the same).
    noise_device: str = "cpu"
    #: "32": float32 throughout (exact to the reference). "bf16": the tail (the blocks after the bottleneck)
    #: runs under bfloat16 autocast; alpha, the loss and Adam stay float32.
    precision: str = "32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", str(self.precision))
        if self.noise_device not in ("cpu", "auto"):
            raise ValueError(f"noise_device must be 'cpu' or 'auto', got {self.noise_device!r}")
        if self.precision not in ("32", "bf16"):
            raise ValueError(f"precision must be '32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.batch_invariant, bool):
            raise TypeError(f"batch_invariant must be a bool, got {type(self.batch_invariant).__name__}")
        for name in ("vision_layer", "text_layer", "steps", "num_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.num_noise < 1:
            raise ValueError(f"num_noise must be >= 1, got {self.num_noise}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")

    def layer(self, modality: Modality) -> int:
        return self.vision_layer if modality == "image" else self.text_layer


@dataclass
class TowerFit:
    """What one tower's fit leaves: per-token capacity of the last forward pass and the loss curves."""

    capacity: Tensor  # (B, T): nats per token, summed over channels, zero at padding
    fit: Tensor  # (B,): mean cosine similarity of the last forward pass
    capacity_curve: Tensor  # (steps, B): capacity term per step
    fit_curve: Tensor  # (steps, B): fit term per step

    @staticmethod
    def concat(parts: list["TowerFit"], tokens: int) -> "TowerFit":
        """Fits of sample groups as one batch, capacities zero-padded to ``tokens`` positions."""
        return TowerFit(
            capacity=torch.cat([F.pad(p.capacity, (0, tokens - p.capacity.shape[1])) for p in parts]),
            fit=torch.cat([p.fit for p in parts]),
            capacity_curve=torch.cat([p.capacity_curve for p in parts], dim=1),
            fit_curve=torch.cat([p.fit_curve for p in parts], dim=1),
        )


@dataclass
class AttributionResult:
    """Maps of a batch of image-text pairs.

    ``image_maps`` (B, H, W) and ``text_maps`` (B, L) are min-max normalised to
    [0, 1] (text maps are zero beyond each sample's length); ``image_capacity``
    (B, prefix tokens + rows * cols: CLS first where the model has one, none for
    SigLIP) and ``text_capacity`` (B, L) are the raw per-token capacities in nats.
    """

    image_maps: Tensor
    text_maps: Tensor
    image_capacity: Tensor
    text_capacity: Tensor
    patch_grid: tuple[int, int]
    image_fit: Tensor
    text_fit: Tensor
    curves: dict[str, Tensor] = field(default_factory=dict)

    @property
    def image_patch_capacity(self) -> Tensor:
        """Raw capacity on the patch grid (B, rows, cols), prefix tokens (CLS) dropped."""
        rows, cols = self.patch_grid
        return self.image_capacity[:, -rows * cols :].reshape(-1, rows, cols)


# --------------------------------------------------------------------------- maps
def minmax(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-row min-max to [0, 1] over the last dims; masked-out entries become 0.

    A constant row (where the reference would divide by zero) maps to zeros.
    """
    flat = values.flatten(1)
    keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten(1)
    low = flat.masked_fill(~keep, math.inf).amin(1, keepdim=True)
    high = flat.masked_fill(~keep, -math.inf).amax(1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0)
    return scaled.masked_fill(~keep, 0).view_as(values)


def image_maps_from_capacity(token_capacity: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Drop the prefix tokens, reshape to the patch grid, upsample bilinearly to ``size``, min-max."""
    rows, cols = grid
    patches = token_capacity[:, -rows * cols :].reshape(-1, 1, rows, cols)
    upsampled = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
    return minmax(upsampled[:, 0])


# ------------------------------------------------------------------------- noise
def generators_for(seeds: Tensor, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, on ``device``: a CPU generator's stream is the same on any machine."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds.tolist()]


def draw_noise(
    generators: list[torch.Generator], copies: int, token_mask: Tensor, dim: int, dtype: torch.dtype
) -> Tensor:
    """Standard-normal noise (B, K, T, D) on the generators' device: each sample draws (K, its real tokens, D) from its own."""
    batch, tokens = token_mask.shape
    device = generators[0].device
    mask = token_mask.to(device)
    noise = torch.zeros(batch, copies, tokens, dim, dtype=dtype, device=device)
    for row, gen in enumerate(generators):
        real = mask[row]
        draw = torch.randn((copies, int(real.sum()), dim), generator=gen, dtype=dtype, device=device)
        if bool(real.all()):
            noise[row] = draw
        else:
            noise[row][:, real] = draw
    return noise


# --------------------------------------------------------------------------- fit
class TowerObjective:
    """Per-sample M2IB loss terms of one tower for a batch; everything constant is prepared once.

    Calling it with alpha (B, T, D) and noise (B, K, T, D) returns the capacity
    term (B,), the fit term (B,) and the per-element capacity (B, T, D), zero
    at padding. Sample b's terms depend on alpha[b] and noise[b] only.
    """

    def __init__(
        self, backbone: VisionLanguageBackbone, modality: Modality, state: TowerState, target: Tensor, copies: int,
        precision: str = "32",
    ):
        self.backbone, self.modality, self.copies = backbone, modality, copies
        self.bf16 = precision == "bf16"
        self.hidden = state.hidden.detach()
        self.token_mask = state.token_mask
        self.copied_state = state.repeat_interleave(copies)
        self.copied_target = target.detach().repeat_interleave(copies, dim=0)
        self.element_mask = state.token_mask[:, :, None].to(self.hidden.dtype)
        self.real = state.token_mask[:, None, :, None]  # (B, 1, T, 1): positions that get noise
        self.elements = state.token_mask.sum(1).to(self.hidden.dtype) * self.hidden.shape[-1]

    def __call__(self, alpha: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden, (batch, tokens, dim) = self.hidden, self.hidden.shape
        with torch.autocast(hidden.device.type, enabled=False):  # the bottleneck and the loss stay in full precision
            mu, var = masked_moments(hidden, alpha)
            nats = capacity(mu, var) * self.element_mask  # the same for every noise copy
            noisy = torch.where(self.real, sample(mu[:, None], var[:, None], noise), hidden[:, None])
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            embedding = self.backbone.tail(self.modality, noisy.reshape(batch * self.copies, tokens, dim), self.copied_state)
        with torch.autocast(hidden.device.type, enabled=False):
            fit = F.cosine_similarity(embedding.to(hidden.dtype), self.copied_target, dim=-1, eps=1e-6).view(batch, self.copies).mean(1)
            return nats.sum((1, 2)) / self.elements, fit, nats


def fit_tower(
    backbone: VisionLanguageBackbone,
    modality: Modality,
    state: TowerState,
    target: Tensor,
    seeds: Tensor,
    config: M2IBConfig,
) -> TowerFit:
    """Fit the bottleneck on ``state.hidden`` for a batch; ``target`` is the other tower's clean embedding."""
    objective = TowerObjective(backbone, modality, state, target, config.num_noise, config.precision)
    hidden = objective.hidden
    generators = generators_for(seeds, hidden.device if config.noise_device == "auto" else "cpu")
    alpha = torch.full_like(hidden, INITIAL_ALPHA, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=config.lr)
    capacity_curve, fit_curve = [], []
    # One autocast region over the whole fit, so that bf16 casts of the weights are made once, not at every step.
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=objective.bf16):
        for step in range(config.steps):
            noise = draw_noise(generators, config.num_noise, state.token_mask, hidden.shape[-1], hidden.dtype)
            compression, fit, nats = objective(alpha, noise.to(hidden.device))
            capacity_curve.append(compression.detach())
            fit_curve.append(fit.detach())
            if step == config.steps - 1:
                break  # the map is read from this pass; the reference's last update changes nothing that is returned
            loss = (config.beta * compression - fit).sum()  # a sum: each sample's gradient equals its solo run's
            (alpha.grad,) = torch.autograd.grad(loss, [alpha])
            with torch.autocast(hidden.device.type, enabled=False):
                optimizer.step()
    return TowerFit(
        capacity=nats.detach().sum(-1),
        fit=fit.detach(),
        capacity_curve=torch.stack(capacity_curve),
        fit_curve=torch.stack(fit_curve),
    )


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards, also on errors."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


# -------------------------------------------------------------------- validation
def _as_seeds(seed: Seeds, batch: int) -> Tensor:
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a 1-D integer tensor, got bool")
    if isinstance(seed, int):
        return torch.full((batch,), seed, dtype=torch.long)
    seeds = torch.as_tensor(seed)
    if seeds.is_floating_point() or seeds.dtype == torch.bool or seeds.dim() != 1:
        raise TypeError(f"seed must be an int or a 1-D integer tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
    if seeds.numel() != batch:
        raise ValueError(f"seed has {seeds.numel()} entries for a batch of {batch} samples")
    return seeds.long().cpu()


def _check_inputs(pixel_values: Any, input_ids: Any, attention_mask: Any) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (B, C, H, W), got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor, got {pixel_values.dtype}")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values holds NaN or infinite values")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: every text needs at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    if attention_mask.is_floating_point() and not torch.isfinite(attention_mask).all():
        raise ValueError("attention_mask holds NaN or infinite values")
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all padding: every text needs at least one real token")
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"batch size mismatch: pixel_values has {pixel_values.shape[0]} images, input_ids {input_ids.shape[0]} texts"
        )
    return pixel_values, input_ids, attention_mask.long()


def screen(backbone: VisionLanguageBackbone, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[str | None]:
    """Per sample, why the backbone would refuse it (the engine's input checks and the adapter's ``validate_inputs``), or None."""
    parameter = next(backbone.module.parameters())
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    reasons: list[str | None] = []
    for b in range(pixel_values.shape[0]):
        length = int(mask[b].nonzero().max()) + 1 if bool(mask[b].any()) else input_ids.shape[1]
        try:
            pixels, ids, sample_mask = _check_inputs(pixel_values[b : b + 1], input_ids[b : b + 1, :length], mask[b : b + 1, :length])
            backbone.validate_inputs(pixels.to(parameter.device, parameter.dtype), ids.to(parameter.device), sample_mask.to(parameter.device))
            reasons.append(None)
        except (ValueError, TypeError) as err:
            reasons.append(str(err))
    return reasons


# ---------------------------------------------------------------------- front end
class M2IB:
    """Multi-modal information bottleneck attribution (Wang et al., NeurIPS 2023).

    >>> explainer = M2IB(clip_model, M2IBConfig(vision_layer=9, text_layer=9))
    >>> result = explainer.attribute(pixel_values, input_ids, attention_mask, seed=0)
    """

    def __init__(self, model: Any, config: M2IBConfig | None = None, *, adapter: str = "auto"):
        self.backbone = as_backbone(model, adapter)
        self.config = config or M2IBConfig()
        #: the block of each tower, negative indices resolved
        self.layers: dict[Modality, int] = {
            m: resolve_layer(
                self.config.layer(m), self.backbone.num_layers(m), "vision_layer" if m == "image" else "text_layer", f"the {m} tower"
            )
            for m in MODALITIES
        }

    @property
    def device(self) -> torch.device:
        return next(self.backbone.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.module.parameters()).dtype

    def screen(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[str | None]:
        """Per sample, why :meth:`attribute` would refuse it (non-finite pixels, no end-of-text token, too long, ...), or None.

        Lets a dataset run attribute the good samples of a batch and record the others.
        """
        return screen(self.backbone, pixel_values, input_ids, attention_mask)

    def attribute(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, seed: Seeds = 0
    ) -> AttributionResult:
        """Fit both bottlenecks for every pair of the batch and return their maps."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "M2IB needs gradients but runs under torch.inference_mode(); "
                "in Lightning use Trainer(inference_mode=False)"
            )
        pixel_values, input_ids, attention_mask = _check_inputs(pixel_values, input_ids, attention_mask)
        seeds = _as_seeds(seed, pixel_values.shape[0])
        pixel_values = pixel_values.to(self.device, self.dtype)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        self.backbone.validate_inputs(pixel_values, input_ids, attention_mask)

        with eval_mode(self.backbone.module):
            if self.config.batch_invariant:
                # Each sample alone, its text cut after its last real token: the shapes of its solo run.
                extents = attention_mask.shape[1] - attention_mask.flip(1).argmax(1)
                parts = [
                    self._fit(pixel_values[b : b + 1], input_ids[b : b + 1, :n], attention_mask[b : b + 1, :n], seeds[b : b + 1])
                    for b, n in enumerate(extents.tolist())
                ]
                widths = {"image": parts[0]["image"].capacity.shape[1], "text": attention_mask.shape[1]}
                fits = {m: TowerFit.concat([p[m] for p in parts], widths[m]) for m in MODALITIES}
            else:
                fits = self._fit(pixel_values, input_ids, attention_mask, seeds)

        image, text = fits["image"], fits["text"]
        grid = self.backbone.patch_grid(pixel_values)
        return AttributionResult(
            image_maps=image_maps_from_capacity(image.capacity, grid, tuple(pixel_values.shape[-2:])),
            text_maps=minmax(text.capacity, attention_mask.bool()),
            image_capacity=image.capacity,
            text_capacity=text.capacity,
            patch_grid=grid,
            image_fit=image.fit,
            text_fit=text.fit,
            curves={
                "image/capacity": image.capacity_curve,
                "image/fit": image.fit_curve,
                "text/capacity": text.capacity_curve,
                "text/fit": text.fit_curve,
            },
        )


    def _fit(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor) -> dict[Modality, TowerFit]:
        """Both towers' fits for one group of samples, fitted together."""
        with torch.no_grad():
            inputs = {m: tower_inputs(m, pixel_values, input_ids, attention_mask) for m in MODALITIES}
            targets = {m: self.backbone.embed(m, inputs[m]) for m in MODALITIES}
            states = {m: self.backbone.prefix(m, inputs[m], self.layers[m]) for m in MODALITIES}
        with torch.enable_grad():
            return {m: fit_tower(self.backbone, m, states[m], targets[other(m)], seeds, self.config) for m in MODALITIES}


def attribute(
    model: Any,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    vision_layer: int = 9,
    text_layer: int = 9,
    beta: float = 0.1,
    steps: int = 10,
    lr: float = 1.0,
    num_noise: int = 10,
    seed: Seeds = 0,
    batch_invariant: bool = True,
    noise_device: str = "cpu",
    precision: str = "32",
    answer_ids: Tensor | None = None,
    answer_mask: Tensor | None = None,
    max_new_tokens: int = 16,
    **model_inputs: Tensor,
) -> Any:
    """M2IB image and text maps for a batch of pairs; see :class:`M2IB`.

    ``model`` is a ``transformers.CLIPModel``, ``SiglipModel`` or ``BlipForImageTextRetrieval``, any model a
    registered adapter accepts, or an adapter itself; layers may be negative (-1: the last block); ``seed`` an
    int for every sample or a 1-D tensor with one seed per sample. With one
    sample and seed ``s`` the result equals the official implementation's after
    ``torch.manual_seed(s)`` before each of its two map calls.

    For a VLM that answers questions (``transformers.LlavaForConditionalGeneration``, or an adapter with the
    ``answers`` capability) the fit term is log p(answer): ``answer_ids`` (with ``answer_mask``) are the answers
    to explain; without them, the model's own greedy answers (up to ``max_new_tokens``), kept in the result's
    ``answer_ids``. Returns an :class:`~m2ib_lightning.answers.AnswerAttribution` then. ``model_inputs``: what such a
    family needs besides, by keyword (Qwen2-VL: ``image_grid_thw``, with ``pixel_values`` as its processor packs them).
    """
    config = M2IBConfig(
        vision_layer=vision_layer, text_layer=text_layer, beta=beta, steps=steps, lr=lr, num_noise=num_noise,
        batch_invariant=batch_invariant, noise_device=noise_device, precision=precision,
    )
    adapter = as_backbone(model)
    if "answers" in claimed(adapter):
        from .answers import attribute_answers

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if answer_ids is None:
            answer_ids, answer_mask = adapter.generate_answers(pixel_values, input_ids, mask, max_new_tokens, **model_inputs)
        return attribute_answers(adapter, pixel_values, input_ids, mask, answer_ids, answer_mask, config=config, seed=seed,
                                 **model_inputs)
    if answer_ids is not None:
        raise ValueError(f"answer_ids: {type(adapter).__name__} does not answer questions (a dual encoder); "
                         "pass answer_ids only for a VLM with the answers capability")
    if model_inputs:
        raise TypeError(f"{', '.join(model_inputs)}: a dual encoder ({type(adapter).__name__}) takes no inputs besides "
                        "pixel_values, input_ids and attention_mask")
    return M2IB(adapter, config).attribute(pixel_values, input_ids, attention_mask, seed=seed)
