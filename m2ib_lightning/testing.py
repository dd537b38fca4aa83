"""Conformance checks for backbone adapters, and the naive M2IB reference they are checked against.

Run ``check_backbone(adapter, example_inputs)`` on your own adapter (see
docs/backbones.md): it fails with :class:`BackboneCheckError`, whose message
names the broken property, or returns the list of properties that hold.
Use a batch of at least two samples whose texts differ in length, and a
float64 model for the M2IB comparison (``check_backbone(MyAdapter(model.double()), ...)``):
in float32, Adam at lr 1 amplifies last-bit differences to ~1e-5 over a fit.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import MODALITIES, Modality, VisionLanguageBackbone, as_backbone
from .backbones.base import other, tower_inputs
from .backbones.capabilities import claimed
from .engine import M2IB, M2IBConfig, eval_mode, minmax


class BackboneCheckError(AssertionError):
    """A conformance property that does not hold; ``prop`` names it."""

    def __init__(self, prop: str, detail: str):
        super().__init__(f"{prop}: {detail}")
        self.prop = prop


# ----------------------------------------------------------------- naive reference
def _cut(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """One sample's text without its trailing padding."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    length = int(mask[0].nonzero().max()) + 1
    return input_ids[:, :length], mask[:, :length]


def naive_m2ib(
    model: Any,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    vision_layer: int,
    text_layer: int,
    beta: float = 0.1,
    steps: int = 10,
    lr: float = 1.0,
    num_noise: int = 10,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """M2IB of one pair the way the official code (YingWANGG/M2IB, ce4d7a0) computes it, on any adapter.

    Deliberately slow and simple: the bottleneck is a forward hook on block
    ``layer``'s output; every step runs *both* towers in full, through the
    adapter's ``embed`` (the model's own forward), on K expanded copies; noise
    comes from the global RNG, seeded before each map. Returns (image map (H, W),
    text map (L,), image capacity (T,), text capacity (L,)).
    """
    backbone = as_backbone(model)
    if pixel_values.shape[0] != 1 or input_ids.shape[0] != 1:
        raise ValueError("naive_m2ib attributes one pair at a time")
    input_ids, attention_mask = _cut(input_ids, attention_mask)
    inputs = {m: tower_inputs(m, pixel_values, input_ids, attention_mask) for m in MODALITIES}
    layers = {"image": vision_layer % backbone.num_layers("image"), "text": text_layer % backbone.num_layers("text")}
    kwargs = dict(beta=beta, steps=steps, lr=lr, num_noise=num_noise)
    capacities = {}
    with eval_mode(backbone.module):
        for modality in ("text", "image"):  # the reference's order: text map first
            torch.manual_seed(seed)
            capacities[modality] = _naive_fit(backbone, modality, inputs, layers[modality], **kwargs)
    rows, cols = backbone.patch_grid(pixel_values)
    patches = capacities["image"][-rows * cols :].reshape(1, 1, rows, cols)
    heat = F.interpolate(patches, size=tuple(pixel_values.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    normalise = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
    return normalise(heat), normalise(normalise(capacities["text"])), capacities["image"], capacities["text"]


def _naive_fit(backbone: VisionLanguageBackbone, modality: Modality, inputs: dict, layer: int, *, beta, steps, lr, num_noise) -> Tensor:
    expand = lambda t: t.expand(num_noise, *t.shape[1:])  # noqa: E731
    copies = {m: {k: expand(v) for k, v in inputs[m].items()} for m in MODALITIES}
    with torch.no_grad():
        hidden = _hidden_after(backbone, modality, inputs[modality], layer)
    alpha = torch.full((1, *hidden.shape[1:]), 5.0, dtype=hidden.dtype, device=hidden.device, requires_grad=True)
    saved: dict[str, Tensor] = {}

    def bottleneck(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        lamb = torch.sigmoid(alpha).expand(x.shape[0], x.shape[1], -1)
        mu = x * lamb
        var = (1 - lamb) ** 2
        saved["capacity"] = -0.5 * (1 + torch.log(var) - mu**2 - var)
        t = mu + var.sqrt() * mu.data.new(mu.size()).normal_()
        return (t, *output[1:]) if isinstance(output, tuple) else t

    optimizer = torch.optim.Adam([alpha], lr=lr)
    grads = {p: p.grad for p in backbone.module.parameters()}
    handle = backbone.blocks(modality)[layer].register_forward_hook(bottleneck)
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            explained = backbone.embed(modality, copies[modality])
            target = backbone.embed(other(modality), copies[other(modality)])
            fitting = F.cosine_similarity(explained, target, eps=1e-6).mean()
            loss = beta * saved["capacity"].mean() - fitting
            loss.backward()  # through the whole model, as the reference does (its cost included)
            optimizer.step()
    finally:
        handle.remove()
        for parameter, grad in grads.items():  # the model's own .grad, as it was
            parameter.grad = grad
    return torch.nansum(saved["capacity"].mean(0), -1).detach()


def _hidden_after(backbone: VisionLanguageBackbone, modality: Modality, inputs: dict, layer: int) -> Tensor:
    """Block ``layer``'s output in a full forward, caught with a hook."""
    caught: dict[str, Tensor] = {}

    def catch(module, args, output):
        caught["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = backbone.blocks(modality)[layer].register_forward_hook(catch)
    try:
        backbone.embed(modality, inputs)
    finally:
        handle.remove()
    return caught["hidden"]


# ------------------------------------------------------------------- conformance
def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-10, "rtol": 1e-8} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}


def _close(prop: str, actual: Tensor, expected: Tensor, what: str, **tolerance: float) -> None:
    try:
        torch.testing.assert_close(actual, expected, **tolerance)
    except AssertionError as err:
        raise BackboneCheckError(prop, f"{what}: {str(err).splitlines()[0]} {str(err).splitlines()[-1]}") from None


def _snapshot(module: nn.Module) -> dict[str, Any]:
    return {
        "parameters": {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in module.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in module.named_buffers()},
        "training": {n: m.training for n, m in module.named_modules()},
        "hooks": {
            n: tuple(len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
            for n, m in module.named_modules()
        },
    }


def _check_untouched(prop: str, before: dict[str, Any], module: nn.Module, when: str) -> None:
    after = _snapshot(module)
    for name, (value, requires_grad, grad) in before["parameters"].items():
        now, now_requires, now_grad = after["parameters"][name]
        if not torch.equal(value, now):
            raise BackboneCheckError(prop, f"parameter {name} changed {when}")
        if requires_grad != now_requires or grad is not now_grad:
            raise BackboneCheckError(prop, f"parameter {name}'s requires_grad or .grad changed {when}")
    for name, value in before["buffers"].items():
        if not torch.equal(value, after["buffers"][name]):
            raise BackboneCheckError(prop, f"buffer {name} changed {when}")
    for key in ("training", "hooks"):
        changed = [n for n, v in before[key].items() if after[key][n] != v]
        if changed:
            raise BackboneCheckError(prop, f"{key} of module {changed[0] or '<root>'} changed {when}")


class _FailingTail:
    """A proxy adapter whose tail raises on its ``fail_at``-th call: an error in the middle of a fit."""

    def __init__(self, backbone: VisionLanguageBackbone, fail_at: int = 2):
        self._backbone, self._calls, self._fail_at = backbone, 0, fail_at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    def tail(self, *args: Any, **kwargs: Any) -> Tensor:
        self._calls += 1
        if self._calls >= self._fail_at:
            raise _InjectedError("injected by check_backbone")
        return self._backbone.tail(*args, **kwargs)


class _InjectedError(RuntimeError):
    pass


def check_backbone(
    backbone: Any,
    example_inputs: dict[str, Tensor],
    *,
    naive_layers: tuple[int, ...] = (0, -1),
    m2ib_steps: int = 4,
    m2ib_noise: int = 3,
) -> list[str]:
    """Check the properties the M2IB engine relies on; raise :class:`BackboneCheckError` naming the first that fails.

    ``example_inputs``: ``pixel_values`` (B, C, H, W), ``input_ids`` (B, L) and
    optionally ``attention_mask``, with B >= 2. The properties:
    ``prefix/tail``, ``batch invariance``, ``no cross-talk``, ``padding``,
    ``model untouched`` and ``naive reference``; then one per further capability the adapter claims:
    ``preprocessing`` (an image and a caption become inputs the towers take, token names and the display
    picture fit them) and ``attention`` (one attention module per block, whose eager probabilities are
    distributions over real keys, and the attention setting restored). An adapter of a VLM that answers
    questions (the ``answers`` capability) is checked by :func:`check_answers`.
    """
    backbone = as_backbone(backbone)  # refuses an adapter that lacks a member of a capability it claims
    capabilities = claimed(backbone)
    if "towers" not in capabilities:
        return check_answers(backbone, example_inputs, naive_layers=naive_layers, m2ib_steps=m2ib_steps, m2ib_noise=m2ib_noise)
    pixels, ids = example_inputs["pixel_values"], example_inputs["input_ids"]
    mask = example_inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if pixels.shape[0] < 2:
        raise ValueError("example_inputs must hold at least two samples")
    backbone.validate_inputs(pixels, ids, mask)
    inputs = {m: tower_inputs(m, pixels, ids, mask) for m in MODALITIES}
    tol = _tolerance(pixels.dtype)
    passed = []
    module = backbone.module
    with eval_mode(module), torch.no_grad():
        # 1. tail(prefix(x, L)) == embed(x) at every layer
        for m in MODALITIES:
            clean = backbone.embed(m, inputs[m])
            for layer in range(backbone.num_layers(m)):
                state = backbone.prefix(m, inputs[m], layer)
                _close("prefix/tail", backbone.tail(m, state.hidden, state), clean, f"{m} tower, layer {layer}", **tol)
        passed.append("prefix/tail")

        # 2. batch invariance: each sample alone (its text without padding) equals its row in the batch
        for m in MODALITIES:
            batch = backbone.embed(m, inputs[m])
            middle = backbone.num_layers(m) // 2
            state = backbone.prefix(m, inputs[m], middle)
            tails = backbone.tail(m, state.hidden, state)
            for b in range(pixels.shape[0]):
                one_ids, one_mask = _cut(ids[b : b + 1], mask[b : b + 1])
                alone = tower_inputs(m, pixels[b : b + 1], one_ids, one_mask)
                _close("batch invariance", backbone.embed(m, alone)[0], batch[b], f"{m} embedding of sample {b}", **tol)
                one = backbone.prefix(m, alone, middle)
                _close("batch invariance", backbone.tail(m, one.hidden, one)[0], tails[b], f"{m} tail of sample {b}", **tol)
        passed.append("batch invariance")

        # 4. padding never reaches real tokens, in the prefix or the tail
        if not bool(mask.bool().all()):
            state = backbone.prefix("text", inputs["text"], backbone.num_layers("text") // 2)
            pad = ~state.token_mask
            other_ids = ids.masked_fill(~mask.bool(), int(ids.max()))
            changed = backbone.prefix("text", {"input_ids": other_ids, "attention_mask": mask}, state.layer)
            if not torch.equal(changed.hidden[~pad], state.hidden[~pad]):
                raise BackboneCheckError("padding", "other token ids at padding positions changed real tokens' prefix output")
            noise = torch.randn(state.hidden.shape, generator=torch.Generator().manual_seed(0), dtype=state.hidden.dtype)
            noisy = state.hidden + pad[..., None] * noise.to(state.hidden.device) * 100
            if not torch.equal(backbone.tail("text", noisy, state), backbone.tail("text", state.hidden, state)):
                raise BackboneCheckError("padding", "noise at padding positions changed the text tail's embedding")
            passed.append("padding")

    # 3. no cross-talk: one sample's embedding has zero gradient w.r.t. every other sample's hidden states
    with eval_mode(module), torch.enable_grad():
        for m in MODALITIES:
            state = backbone.prefix(m, inputs[m], backbone.num_layers(m) // 2)
            hidden = state.hidden.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(backbone.tail(m, hidden, state)[0].sum(), [hidden])
            if bool(grad[1:].ne(0).any()):
                raise BackboneCheckError("no cross-talk", f"sample 0's {m} embedding depends on other samples' hidden states")
    passed.append("no cross-talk")

    # 5. the model untouched and hooks gone, after a fit and after an error inside one
    config = M2IBConfig(vision_layer=naive_layers[0], text_layer=naive_layers[0], steps=m2ib_steps, num_noise=m2ib_noise)
    before = _snapshot(module)
    M2IB(backbone, config).attribute(pixels, ids, mask)
    _check_untouched("model untouched", before, module, "by a fit")
    try:
        M2IB(_FailingTail(backbone), config).attribute(pixels, ids, mask)
    except _InjectedError:
        pass
    else:
        raise BackboneCheckError("model untouched", "an error raised inside the fit did not reach the caller")
    _check_untouched("model untouched", before, module, "by a fit that raised an error")
    passed.append("model untouched")

    # 6. M2IB equals the naive full-forward fit
    maps_tol = {"atol": 1e-8, "rtol": 0} if pixels.dtype == torch.float64 else {"atol": 5e-3, "rtol": 0}
    for layer in naive_layers:
        config = replace(config, vision_layer=layer, text_layer=layer)
        result = M2IB(backbone, config).attribute(pixels[:1], ids[:1], mask[:1], seed=3)
        image_map, text_map, _, _ = naive_m2ib(
            backbone, pixels[:1], ids[:1], mask[:1], vision_layer=layer, text_layer=layer,
            steps=m2ib_steps, num_noise=m2ib_noise, seed=3,
        )
        length = text_map.shape[0]
        _close("naive reference", result.image_maps[0], image_map, f"image map at layer {layer}", **maps_tol)
        _close("naive reference", minmax(result.text_maps[:, :length])[0], text_map, f"text map at layer {layer}", **maps_tol)
    passed.append("naive reference")
    if "preprocessing" in capabilities:
        _check_preprocessing(backbone, pixels)
        passed.append("preprocessing")
    if "attention" in capabilities:
        _check_attention(backbone, inputs)
        passed.append("attention")
    if "probing" in capabilities:
        _check_probing(backbone, pixels, ids, mask)
        passed.append("probing")
    return passed


def _check_preprocessing(backbone: Any, pixels: Tensor) -> None:
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (pixels.shape[-2] + 7, pixels.shape[-1] + 3, 3),
                                          generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy())
    values = backbone.image_inputs(image)
    if not isinstance(values, Tensor) or values.shape != pixels.shape[1:]:
        raise BackboneCheckError("preprocessing", f"image_inputs gave {getattr(values, 'shape', type(values))}, "
                                                  f"the towers take {tuple(pixels.shape[1:])}")
    text = backbone.text_inputs("a red circle left of a blue square")
    ids = torch.tensor([text.ids])
    backbone.validate_inputs(values[None].to(pixels.dtype), ids, torch.ones_like(ids))
    for name, out in (("token_strings", backbone.token_strings(text.ids)), ("special_mask", backbone.special_mask(text.ids))):
        if len(out) != len(text.ids):
            raise BackboneCheckError("preprocessing", f"{name} gave {len(out)} entries for {len(text.ids)} token ids")
    picture = backbone.display_image(values)
    if picture.shape != (*values.shape[-2:], 3) or picture.dtype != "uint8":
        raise BackboneCheckError("preprocessing", f"display_image gave {picture.shape} {picture.dtype}, not (H, W, 3) uint8")
    if not isinstance(backbone.pad_token_id, int):
        raise BackboneCheckError("preprocessing", f"pad_token_id is {backbone.pad_token_id!r}, not an int")


def _attention_settings(module: nn.Module) -> list[Any]:
    """The attention implementation of a model's config and of its vision and text sub-configs (what
    ``eager_attention`` must give back)."""
    config = getattr(module, "config", None)
    configs = (config, getattr(config, "vision_config", None), getattr(config, "text_config", None))
    return [getattr(c, "_attn_implementation", None) for c in configs if c is not None]


def _check_attention(backbone: Any, inputs: dict[str, dict[str, Tensor]]) -> None:
    module = backbone.module
    before = _attention_settings(module)
    for m in MODALITIES:
        modules = backbone.attention_modules(m)
        if len(modules) != backbone.num_layers(m):
            raise BackboneCheckError("attention", f"{len(modules)} {m} attention modules for {backbone.num_layers(m)} blocks")
        probs: list[Tensor] = []
        handles = [a.register_forward_hook(lambda mod, args, out: probs.append(out[1])) for a in modules]
        try:
            with backbone.eager_attention(), eval_mode(module), torch.no_grad():
                backbone.embed(m, inputs[m])
        finally:
            for handle in handles:
                handle.remove()
        if len(probs) != len(modules) or any(p is None or p.dim() != 4 for p in probs):
            raise BackboneCheckError("attention", f"the {m} attention modules gave no (B, heads, T, T) probabilities in eager mode")
        sums = torch.stack([p.sum(-1) for p in probs]).double()
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise BackboneCheckError("attention", f"{m} attention rows do not sum to 1")
    after = _attention_settings(module)
    if after != before:
        raise BackboneCheckError("attention", f"eager_attention left the attention implementation at {after}, not {before}")


def _check_probing(adapter: Any, pixels: Tensor, ids: Tensor, mask: Tensor, **model_inputs: Tensor) -> None:
    """Every site of every probe tower: a module of the model, (N, T, D) with D split evenly into its heads; patching
    it with its own activation changes nothing (bit for bit), zeroing it in one row changes that row's decision and no
    other row's; head attention gives one distribution over keys per head and layer; hooks gone after."""
    from .probing.patching import site_hooks

    module = adapter.module
    owned = {id(m) for m in module.modules()}
    before = _snapshot(module)
    defaults = {adapter.default_probe_tower(m): m for m in reversed(MODALITIES)}
    with eval_mode(module), torch.no_grad():
        for tower in adapter.probe_towers:
            inputs = adapter.decision_inputs(pixels, ids, mask, defaults.get(tower, "image"), **model_inputs)
            clean = adapter.decision_logits(inputs, 2, tower)
            for name in adapter.probe_sites(tower):
                for layer in range(adapter.probe_layers(tower)):
                    site, where = adapter.probe_site(tower, name, layer), f"{tower} site {name} at layer {layer}"
                    if id(site.module) not in owned:
                        raise BackboneCheckError("probing", f"{where} is not a module of the model")
                    seen: list[Tensor] = []
                    with site_hooks([site], lambda _, act: seen.append(act.clone()), rows=2):
                        same = adapter.decision_logits(inputs, 2, tower)
                    if len(seen) != 1 or seen[0].dim() != 3 or (site.heads and seen[0].shape[-1] % site.heads):
                        raise BackboneCheckError("probing", f"{where} gave {[tuple(a.shape) for a in seen]}, not one (N, T, D) "
                                                            f"activation with D divisible by {site.heads} heads")
                    if not torch.equal(same, clean):
                        raise BackboneCheckError("probing", f"hooking {where} without a change changed the decision")

                    def zero_row_1(_: int, act: Tensor) -> None:
                        act[1] = 0

                    with site_hooks([site], zero_row_1, rows=2):
                        zeroed = adapter.decision_logits(inputs, 2, tower)
                    if not torch.equal(zeroed[0], clean[0]):
                        raise BackboneCheckError("probing", f"zeroing {where} in one row changed another row's decision")
                    if torch.equal(zeroed[1], clean[1]):
                        raise BackboneCheckError("probing", f"zeroing {where} does not reach the decision")
            heads = [adapter.probe_site(tower, n, 0).heads for n in adapter.probe_sites(tower) if n.endswith("head")]
            if heads:
                probs = adapter.head_attention(tower, inputs)
                if len(probs) != adapter.probe_layers(tower) or any(p.dim() != 4 or p.shape[1] not in heads for p in probs):
                    raise BackboneCheckError("probing", f"head_attention({tower!r}) gave {[tuple(p.shape) for p in probs]}, "
                                                        f"not one (1, heads, queries, keys) per layer")
                sums = torch.stack([p.sum(-1).double().flatten() for p in probs])
                if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                    raise BackboneCheckError("probing", f"head_attention({tower!r}) rows do not sum to 1")
    _check_untouched("probing", before, module, "by probing")


# ------------------------------------------------------------------------------------------- answers
def naive_answer_m2ib(model: Any, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                      answer_mask: Tensor, *, modality: str, layer: int, config: M2IBConfig, seed: int,
                      noise_dtype: torch.dtype | None = None, **model_inputs: Tensor) -> Tensor:
    """M2IB for answers on one sample, the K noise copies one at a time through the whole model: the reference.

    Returns the per-position capacity (T,) at block ``layer``'s output, zero where no noise goes. ``noise_dtype``
    draws the noise in that dtype and casts it (a float64 reference of a float32 fit sees the float32 fit's noise;
    float64's own stream differs); default: the model's.
    """
    from .answers import replaced_output
    from .bottleneck import capacity, masked_moments

    # observed, the language model's last layer runs whole (no rows-only shortcut): the reference is the model's own forward
    with replaced_output(model.blocks("text")[-1], capture=[]):
        batch = model.answer_batch(pixel_values, input_ids, attention_mask, answer_ids, answer_mask, **model_inputs)
        block = model.blocks(modality)[layer]
        captured: list[Tensor] = []
        with torch.no_grad(), replaced_output(block, capture=captured):
            model.answer_log_likelihood(batch)
        hidden, where = model.bottleneck_tokens(modality, batch, captured[0])[0], batch.positions[modality][0]
        alpha = torch.full_like(hidden, 5.0, requires_grad=True)
        optimizer = torch.optim.Adam([alpha], lr=config.lr)
        generator = torch.Generator().manual_seed(seed)
        for step in range(config.steps):
            noise = torch.randn((config.num_noise, int(where.sum()), hidden.shape[-1]), generator=generator,
                                dtype=noise_dtype or hidden.dtype).to(hidden.dtype)
            last = step == config.steps - 1
            optimizer.zero_grad()
            # loss = beta * capacity - mean_k log p_k, its gradient accumulated a copy at a time: one copy's graph
            # held at once, so a float64 reference of a realistically sized model fits in memory
            for k in range(config.num_noise):
                mu, var = masked_moments(hidden, alpha)
                z = hidden.clone()
                z[where] = mu[where] + var[where].sqrt() * noise[k]
                with replaced_output(block, model.bottleneck_output(modality, batch, z[None, None])):
                    fit = model.answer_log_likelihood(batch)[0]
                if not last:
                    (-fit / config.num_noise).backward()
            if last:
                break
            mu, var = masked_moments(hidden, alpha)
            (config.beta * capacity(mu, var)[where].mean()).backward()
            optimizer.step()
        mu, var = masked_moments(hidden, alpha)
        return (capacity(mu, var) * where[:, None]).sum(-1).detach()


def check_answers(model: Any, example_inputs: dict[str, Tensor], *, naive_layers: tuple[int, ...] = (0, -1),
                  m2ib_steps: int = 3, m2ib_noise: int = 2) -> list[str]:
    """The properties M2IB for answers relies on, for an adapter with the ``answers`` capability; raise
    :class:`BackboneCheckError` naming the first that fails.

    ``example_inputs``: ``pixel_values``, ``input_ids``, ``attention_mask``, ``answer_ids`` and ``answer_mask`` of at
    least two samples, best with different question and answer lengths, and what the family needs besides (Qwen2-VL's
    ``image_grid_thw``). The properties: ``no cross-talk`` (one
    sample's log p(answer) has exactly zero gradient w.r.t. every other sample's block outputs), ``batch
    invariance`` (each sample alone gives its row's maps), ``model untouched`` (also after an error inside the fit)
    and ``naive reference`` (the engine equals :func:`naive_answer_m2ib` at ``naive_layers``, both fits); then, where
    claimed, ``answer attention`` (the attention graph runs once per sample with distributions over its keys, and
    the readout lies inside its groups) and ``probing``.
    """
    from .answers import attribute_answers, replaced_output

    model = as_backbone(model)
    example = dict(example_inputs)
    args = [example.pop(k) for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")]
    extra = example  # what the family needs besides (Qwen2-VL's image_grid_thw)
    samples = len(args[1])
    if samples < 2:
        raise ValueError("example_inputs must hold at least two samples")
    module, passed = model.module, []
    tol = {"atol": 1e-10, "rtol": 0} if args[0].dtype == torch.float64 else {"atol": 5e-3, "rtol": 0}
    batch = model.answer_batch(*args, **extra)
    with eval_mode(module):
        for m in MODALITIES:
            block = model.blocks(m)[model.num_layers(m) // 2]
            captured: list[Tensor] = []
            with torch.no_grad(), replaced_output(block, capture=captured):
                model.answer_log_likelihood(batch)
            hidden = captured[0].detach().requires_grad_(True)
            with replaced_output(block, hidden):
                (grad,) = torch.autograd.grad(model.answer_log_likelihood(batch)[0], [hidden])
            if bool(model.bottleneck_tokens(m, batch, grad)[1:].ne(0).any()):
                raise BackboneCheckError("no cross-talk", f"sample 0's log p(answer) depends on other samples' {m} block outputs")
    passed.append("no cross-talk")

    def alone(b: int) -> tuple[list[Tensor], dict[str, Tensor]]:
        names = ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")
        one = model.sample_inputs({**dict(zip(names, args)), **extra}, b)
        return [one.pop(k) for k in names], one

    config = M2IBConfig(vision_layer=naive_layers[0], text_layer=naive_layers[0], steps=m2ib_steps, num_noise=m2ib_noise)
    seeds = list(range(3, 3 + samples))
    both = attribute_answers(model, *args, config=config, seed=seeds, **extra)
    for b in range(samples):
        one, one_extra = alone(b)
        solo = attribute_answers(model, *one, config=config, seed=seeds[b], **one_extra)
        for name in ("image_capacity", "text_capacity"):
            got = getattr(solo, name)[0]
            _close("batch invariance", got, getattr(both, name)[b, :len(got)], f"{name} of sample {b}", **tol)
    passed.append("batch invariance")

    before = _snapshot(module)
    attribute_answers(model, *args, config=config, **extra)
    _check_untouched("model untouched", before, module, "by a fit")
    calls = {"n": 0}
    original = model.answer_log_likelihood

    def failing(batch: Any, copies: int = 1) -> Tensor:
        calls["n"] += 1
        if calls["n"] > 2:
            raise _InjectedError("injected by check_answers")
        return original(batch, copies)

    model.answer_log_likelihood = failing
    try:
        attribute_answers(model, *args, config=config, **extra)
    except _InjectedError:
        pass
    else:
        raise BackboneCheckError("model untouched", "an error raised inside the fit did not reach the caller")
    finally:
        del model.answer_log_likelihood
    _check_untouched("model untouched", before, module, "by a fit that raised an error")
    passed.append("model untouched")

    for layer in naive_layers:
        config = replace(config, vision_layer=layer, text_layer=layer)
        one, one_extra = alone(0)
        result = attribute_answers(model, *one, config=config, seed=3, **one_extra)
        columns = one[2][0].bool().nonzero()[:, 0]
        for m, name in (("image", "image_capacity"), ("text", "text_capacity")):
            index = model.resolve_layer(m, layer, "vision_layer" if m == "image" else "text_layer")
            naive = naive_answer_m2ib(model, *one, modality=m, layer=index, config=config, seed=3, **one_extra)
            got = result.image_capacity[0] if m == "image" else result.text_capacity[0, columns]
            _close("naive reference", got, naive[: len(got)], f"{name} at layer {layer}", **tol)
    passed.append("naive reference")
    if "answer_attention" in claimed(model):
        _check_answer_attention(model, *alone(0))
        passed.append("answer attention")
    if "probing" in claimed(model):
        _check_probing(model, args[0], args[1], args[2], **extra)
        passed.append("probing")
    return passed


def _check_answer_attention(model: Any, args: list[Tensor], extra: dict[str, Tensor]) -> None:
    """On one sample: every module of the attention graph runs once in ``answer_log_likelihood`` and returns
    (1, heads, queries, keys) distributions over its keys, each group of one size wherever it appears; the readout
    names groups of the graph and positions inside them (one score row per answer token, one image position per
    cell); the attention setting comes back after ``eager_attention``."""
    from .backbones.base import attention_probabilities

    module = model.module
    before = _attention_settings(module)
    batch = model.answer_batch(*args, **extra)
    graph = model.attention_graph()
    with model.eager_attention(), eval_mode(module), torch.no_grad():
        probs = attention_probabilities([m for m, _, _ in graph], lambda: model.answer_log_likelihood(batch))
    after = _attention_settings(module)
    if after != before:
        raise BackboneCheckError("answer attention", f"eager_attention left the attention implementation at {after}, not {before}")
    if len(probs) != len(graph):
        raise BackboneCheckError("answer attention", f"the attention graph's {len(graph)} modules were called {len(probs)} times "
                                                     "for one sample (each must run once)")
    sizes: dict[str, int] = {}
    for index, ((_, queries, keys), p) in enumerate(zip(graph, probs)):
        if p is None or p.dim() != 4 or p.shape[0] != 1:
            raise BackboneCheckError("answer attention", f"graph entry {index} gave no (1, heads, queries, keys) probabilities")
        if not torch.allclose(p.sum(-1).double(), torch.ones((), dtype=torch.float64), atol=1e-4):
            raise BackboneCheckError("answer attention", f"graph entry {index}'s attention rows do not sum to 1")
        for group, size in ((queries, p.shape[-2]), (keys, p.shape[-1])):
            if sizes.setdefault(group, size) != size:
                raise BackboneCheckError("answer attention", f"group {group!r} has {sizes[group]} tokens in one entry of the "
                                                             f"graph and {size} in entry {index}")
    readout = model.attention_readout(batch)
    answer_tokens = int(batch.score_mask[0].sum())
    checks = [
        (readout.score_group in sizes and len(readout.score_rows) == answer_tokens, f"score rows: {answer_tokens} answer tokens"),
        (readout.image_group in sizes and len(readout.image_cells) == readout.grid[0] * readout.grid[1], "image cells: one per cell"),
        (readout.text_group in sizes, "text group"),
    ]
    for ok, what in checks:
        if not ok:
            raise BackboneCheckError("answer attention", f"attention_readout: {what} in the graph's groups {sorted(sizes)}")
    for group, positions in ((readout.score_group, readout.score_rows), (readout.image_group, readout.image_cells)):
        if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= sizes[group]):
            raise BackboneCheckError("answer attention", f"attention_readout: positions outside group {group!r} of {sizes[group]} tokens")

