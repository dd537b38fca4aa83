"""M2IB for answers: the bottleneck fitted inside a VLM that answers questions, its fit term the answer's
log-likelihood under teacher forcing (pure torch).

The same bottleneck, alpha (init 5), noise stream, capacity, Adam, steps and map as for dual encoders; only
the fit term and the places change: fit = mean over the K noise copies of sum_t log p(answer_t), per-sample
loss = beta * mean capacity - fit, the batch loss their sum. The bottlenecked block output replaces the
block's own through a forward hook placed before every other hook (transformers records hidden states with
hooks of its own: LLaVA reads ``hidden_states[vision_feature_layer]`` through them), removed after each pass,
also on errors. What a fit cannot change is computed once (the adapter's ``fit_inputs``: the vision tower
for the text fit), the vocabulary projection runs only where answer tokens are predicted, and the K copies
go in one batch. Where the adapter can score from a block's output (``answer_from_block``), the first pass
runs the whole model and records the arguments each later block is called with; every later pass runs only
those blocks, from the bottleneck on, with the same arguments (an explicit tail run: the blocks before the
bottleneck, the vision prefix or the language model's, run once).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones.base import AnswerBatch, ImageLayout, Modality, block_output
from .bottleneck import INITIAL_ALPHA, capacity, masked_moments, sample
from .engine import M2IBConfig, Seeds, _as_seeds, draw_noise, eval_mode, generators_for, minmax


@dataclass
class AnswerAttribution:
    """Maps explaining answers: ``image_capacity`` (B, vision tokens, CLS first where there is one; in the tower's
    own token order), ``image_maps`` (B, H, W) on the pictures as the model saw them, ``text_capacity`` / ``text_maps`` (B, L) aligned with ``input_ids`` (zero at padding
    and at image-token positions), and each fit's log p(answer) at its last pass."""

    image_capacity: Tensor
    image_maps: Tensor
    text_capacity: Tensor
    text_maps: Tensor
    image_fit: Tensor
    text_fit: Tensor
    answer_ids: Tensor  # the answers explained, (B, A), with answer_mask
    answer_mask: Tensor
    image_sizes: Tensor  # (B, 2): each map's (height, width); a batch of pictures of several sizes pads to the largest
    image_patch_capacity: Tensor  # (B, rows, cols): the capacity of each patch on its picture's grid, zero-padded
    text_positions: Tensor  # (B, L) bool: the prompt's tokens the text bottleneck sits on (no padding, no image tokens)

    def image_map(self, index: int) -> Tensor:
        """Sample ``index``'s image map at its picture's own size, padding cut away."""
        height, width = self.image_sizes[index].tolist()
        return self.image_maps[index, :height, :width]


def patch_capacity_on_grids(capacity: Tensor, layout: ImageLayout) -> Tensor:
    """(B, rows, cols) raster grids of the patch capacities, zero past a smaller grid; prefix tokens dropped."""
    rows, cols = (int(v) for v in layout.grids.amax(0))
    grids = capacity.new_zeros(len(capacity), rows, cols)
    for b, (r, c) in enumerate(layout.grids.tolist()):
        patches = layout.cells[b] >= 0
        flat = capacity.new_zeros(r * c)
        flat[layout.cells[b][patches]] = capacity[b][patches]
        grids[b, :r, :c] = flat.view(r, c)
    return grids


def image_maps_on_pictures(patch_capacity: Tensor, layout: ImageLayout) -> Tensor:
    """Each sample's (rows, cols) patch capacities upsampled bilinearly to its picture's size and min-maxed, in one
    (B, max height, max width) tensor, zero outside a smaller picture."""
    height, width = (int(v) for v in layout.sizes.amax(0))
    maps = patch_capacity.new_zeros(len(patch_capacity), height, width)
    for b, ((rows, cols), (h, w)) in enumerate(zip(layout.grids.tolist(), layout.sizes.tolist())):
        grid = patch_capacity[b, :rows, :cols][None, None]
        maps[b, :h, :w] = minmax(F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0])[0]
    return maps


@contextlib.contextmanager
def replaced_output(block: nn.Module, value: Tensor | None = None, capture: list[Tensor] | None = None) -> Iterator[None]:
    """While inside: ``block``'s output is ``value`` (or kept, and appended to ``capture``), ahead of every other
    hook on it; the hook is removed on the way out, also on errors."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if capture is not None:
            capture.append(hidden)
        if value is None:
            return None
        if value.shape != hidden.shape:
            raise RuntimeError(f"the bottleneck holds {tuple(value.shape)}, the block's output is {tuple(hidden.shape)}")
        return (value, *output[1:]) if isinstance(output, tuple) else value

    handle = block.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class BlockCall:
    """How the model's own forward called a block: the arguments besides the hidden states."""

    args: tuple
    kwargs: dict
    hidden_positional: bool

    def __call__(self, block: nn.Module, hidden: Tensor) -> Tensor:
        if self.hidden_positional:
            return block_output(block(hidden, *self.args, **self.kwargs))
        return block_output(block(*self.args, hidden_states=hidden, **self.kwargs))


@contextlib.contextmanager
def recorded_calls(blocks: Sequence[nn.Module], calls: list[BlockCall]) -> Iterator[None]:
    """While inside, each of ``blocks`` appends how it is called to ``calls``; the hooks are removed, also on errors."""

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            calls.append(BlockCall(args[1:], dict(kwargs), True))
        else:
            calls.append(BlockCall((), {k: v for k, v in kwargs.items() if k != "hidden_states"}, False))

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tail_blocks(model: Any, modality: Modality, layer: int) -> Sequence[nn.Module] | None:
    """The blocks an explicit tail run takes from block ``layer``'s output to the one ``answer_from_block`` reads;
    None where the adapter cannot score from a block's output (the whole model then runs at each pass)."""
    end = getattr(model, "tail_end", None)
    last = None if end is None or not hasattr(model, "answer_from_block") else end(modality)
    if last is None or last < layer:
        return None
    return model.blocks(modality)[layer + 1:last + 1]


def _replayable(calls: list[BlockCall], blocks: Sequence[nn.Module]) -> bool:
    """One call per block, none carrying a key/value cache (which a replay would extend)."""
    return len(calls) == len(blocks) and all(c.kwargs.get("past_key_values", c.kwargs.get("past_key_value")) is None
                                             for c in calls)


def replay_tail(model: Any, modality: Modality, batch: Any, tail: Sequence[nn.Module], calls: list[BlockCall],
                output: Tensor, copies: int) -> Tensor:
    """(B * copies,) log p(answer) from the bottleneck's output: the blocks after it with the arguments the model's
    own forward gave them; the text fit leaves its last block (the language model's last layer) to the adapter
    where it can finish from that block's input (``answer_from_last_input``: only the answer-predicting rows)."""
    finish = getattr(model, "answer_from_last_input", None) if modality == "text" and len(tail) else None
    if finish is not None and not calls[-1].args:
        for blk, call in zip(tail[:-1], calls[:-1]):
            output = call(blk, output)
        return finish(batch, output, calls[-1].kwargs, copies)
    for blk, call in zip(tail, calls):
        output = call(blk, output)
    return model.answer_from_block(modality, batch, output, copies)


def fit_answer_bottleneck(model: Any, batch: Any, modality: Modality, layer: int, seeds: Tensor,
                          config: M2IBConfig) -> tuple[Tensor, Tensor]:
    """Fit one tower's bottleneck at block ``layer`` for a batch; returns (per-position capacity (B, T), zero where
    no noise goes, and the last pass's fit term (B,))."""
    block = model.blocks(modality)[layer]
    batch = model.fit_inputs(modality, batch)  # e.g. the vision tower once for the text fit
    captured: list[Tensor] = []
    with torch.no_grad(), replaced_output(block, capture=captured):
        model.answer_log_likelihood(batch, 1)
    hidden = model.bottleneck_tokens(modality, batch, captured[0].detach())
    batch_size, tokens, dim = hidden.shape
    positions = batch.positions[modality]
    if positions.shape != (batch_size, tokens):
        raise RuntimeError(f"{modality} positions are {tuple(positions.shape)}, the block output {(batch_size, tokens)}")
    real, element_mask = positions[:, None, :, None], positions[:, :, None].to(hidden.dtype)
    elements = positions.sum(1).to(hidden.dtype) * dim
    generators = generators_for(seeds, hidden.device if config.noise_device == "auto" else "cpu")
    alpha = torch.full_like(hidden, INITIAL_ALPHA, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=config.lr)
    copies = config.num_noise
    tail, calls, replay = tail_blocks(model, modality, layer), [], False
    device = hidden.device.type
    for step in range(config.steps):
        noise = draw_noise(generators, copies, positions, dim, hidden.dtype).to(hidden.device)
        mu, var = masked_moments(hidden, alpha)
        nats = capacity(mu, var) * element_mask
        noisy = torch.where(real, sample(mu[:, None], var[:, None], noise), hidden[:, None])
        # bf16: the model after the bottleneck under autocast; the bottleneck, the loss and Adam stay in hidden's dtype
        with torch.autocast(device, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            output = model.bottleneck_output(modality, batch, noisy)
            if replay:
                fit = replay_tail(model, modality, batch, tail, calls, output, copies)
            else:
                recording = recorded_calls(tail, calls) if step == 0 and tail is not None else contextlib.nullcontext()
                with replaced_output(block, output), recording:
                    fit = model.answer_log_likelihood(batch, copies)
                replay = tail is not None and _replayable(calls, tail)  # known after the first pass, for every later one
        fit = fit.to(hidden.dtype).view(batch_size, copies).mean(1)
        if step == config.steps - 1:
            break  # the map is read from this pass
        loss = (config.beta * nats.sum((1, 2)) / elements - fit).sum()  # a sum: each sample's gradient is its solo run's
        (alpha.grad,) = torch.autograd.grad(loss, [alpha])
        optimizer.step()
    return nats.detach().sum(-1), fit.detach()


def answer_layers(model: Any, config: M2IBConfig) -> dict[Modality, int]:
    """The bottlenecks' blocks of an answer adapter, ``config``'s layers resolved (negative ones count from the end)."""
    return {"image": model.resolve_layer("image", config.vision_layer, "vision_layer"),
            "text": model.resolve_layer("text", config.text_layer, "text_layer")}


def attribute_answers(
    model: Any,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    answer_ids: Tensor,
    answer_mask: Tensor | None = None,
    *,
    config: M2IBConfig = M2IBConfig(),
    seed: Seeds = 0,
    **model_inputs: Tensor,
) -> AnswerAttribution:
    """Image and text maps of why ``model`` (an answer adapter, e.g. ``HFLlavaAnswerer``) gives ``answer_ids``.

    ``answer_mask`` marks real answer tokens (real first); ``seed``: one per sample or one for the batch;
    ``model_inputs``: what the family needs besides (Qwen2-VL's ``image_grid_thw``). The model is left as it
    was: parameters, gradients, train flags and hooks.
    """
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    answer_mask = torch.ones_like(answer_ids) if answer_mask is None else answer_mask
    for name, tensor, like in (("attention_mask", attention_mask, input_ids), ("answer_mask", answer_mask, answer_ids)):
        if tensor.shape != like.shape:
            raise ValueError(f"{name} must have the shape of its ids {tuple(like.shape)}, got {tuple(tensor.shape)}")
    if len(input_ids) != len(answer_ids):
        raise ValueError(f"input_ids and answer_ids must hold one row per sample, got {len(input_ids)} and {len(answer_ids)}")
    layers = answer_layers(model, config)
    seeds = _as_seeds(seed, len(input_ids))
    module = model.module
    grads = {p: p.requires_grad for p in module.parameters()}
    try:
        module.requires_grad_(False)  # gradients flow to alpha only; the weights' flags come back below
        with eval_mode(module), torch.enable_grad():
            batch = model.answer_batch(pixel_values, input_ids, attention_mask, answer_ids, answer_mask, **model_inputs)
            fits = {m: fit_answer_bottleneck(model, batch, m, layers[m], seeds, config) for m in ("image", "text")}
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
    image_capacity, image_fit = fits["image"]
    positions, fit_text = fits["text"]
    text_capacity, text_real = text_by_input_column(batch, positions, tuple(input_ids.shape))
    patch_capacity = patch_capacity_on_grids(image_capacity, batch.image)
    return AnswerAttribution(
        image_capacity=image_capacity,
        image_maps=image_maps_on_pictures(patch_capacity, batch.image),
        image_sizes=batch.image.sizes,
        image_patch_capacity=patch_capacity,
        text_capacity=text_capacity,
        text_maps=minmax(text_capacity, text_real),
        text_positions=text_real,
        image_fit=image_fit,
        text_fit=fit_text,
        answer_ids=answer_ids,
        answer_mask=answer_mask,
    )


def text_by_input_column(batch: AnswerBatch, values: Tensor, input_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per-position values of the text block (B, T_text) laid out as ``input_ids`` (B, L), and where they are real
    (bottlenecked): zero at padding and at image-token positions, as the exact fit's text capacity."""
    out = values.new_zeros(input_shape)
    real = torch.zeros(input_shape, dtype=torch.bool, device=values.device)
    for b, (columns, sequence) in enumerate(zip(batch.input_columns, batch.prompt_columns)):
        out[b, columns] = values[b, sequence]
        real[b, columns] = batch.positions["text"][b, sequence].bool()
    return out, real


def complete_answers(model: Any, images: list[dict[str, Tensor]], input_ids: Tensor, attention_mask: Tensor,
                     answer_ids: Tensor, answer_mask: Tensor, given: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """The batch's answers: the given ones, and the model's own greedy answer where ``given`` is False; ``images``:
    each sample's image inputs (the adapter's ``join_inputs`` batches any of them)."""
    asked = (~given).nonzero()[:, 0].tolist()
    if not asked:
        return answer_ids, answer_mask
    joined = model.join_inputs([images[b] for b in asked])
    device = input_ids.device
    joined = {k: v.to(device) for k, v in joined.items()}
    generated, generated_mask = model.generate_answers(joined.pop("pixel_values"), input_ids[asked], attention_mask[asked],
                                                       max_new_tokens, **joined)
    width = max(answer_ids.shape[1], generated.shape[1])
    answers = F.pad(answer_ids, (0, width - answer_ids.shape[1]))
    mask = F.pad(answer_mask, (0, width - answer_mask.shape[1]))
    answers[asked], mask[asked] = 0, 0
    answers[asked, :generated.shape[1]], mask[asked, :generated.shape[1]] = generated.to(answers), generated_mask.to(mask)
    return answers, mask


def unanswerable(pictures: list[Tensor] | Tensor, answer_mask: Tensor) -> list[str | None]:
    """Why each sample cannot be explained (None: it can): non-finite pixels, an empty answer, or a picture of
    another size than the batch's first good one (one map size per batch; Qwen2-VL keeps each picture's size)."""
    reasons = ["non-finite pixel values" if not bool(torch.isfinite(p).all()) else
               "the model's own answer is empty (it stopped at once)" if not bool(m.any()) else None
               for p, m in zip(pictures, answer_mask)]
    first = next((p.shape[-2:] for p, r in zip(pictures, reasons) if r is None), None)
    return [r or (None if p.shape[-2:] == first else
                  f"picture of {tuple(p.shape[-2:])} px in a batch of {tuple(first)} px pictures: a batch holds one "
                  "picture size (runs batch by size: m2ib_lightning.data.attribution.same_size_batches)") for p, r in zip(pictures, reasons)]


def answer_fields(model: Any, answer_ids: Tensor, answer_mask: Tensor, given: list[bool]) -> dict[str, list[str]]:
    """What a prediction records of its answers: their text and whether each was given or the model's own."""
    return {"answer": [model.answer_text(a[m.bool()].tolist()) for a, m in zip(answer_ids, answer_mask)],
            "answer_source": ["given" if g else "generate" for g in given]}

