"""A naive M2IB written the way the official code (YingWANGG/M2IB, ce4d7a0) works.

One sample at a time; the bottleneck is put on block ``layer``'s output (here
with a forward hook instead of the reference's module replacement); every step
runs *both* towers in full on K expanded copies; noise comes from the global
RNG, seeded once before each map; ``loss.backward()`` through the unfrozen
model, as the reference does. Used as ground truth by the tests and as the
baseline of ``benchmarks/bench_engine.py``; deliberately slow and simple.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _capacity_of_fit(model, tower, layer, text_ids, image, *, beta, steps, lr, num_noise):
    with torch.no_grad():
        inputs = image if tower is model.vision_model else text_ids
        hidden = tower(inputs, output_hidden_states=True).hidden_states[layer + 1]
    alpha = torch.nn.Parameter(torch.full((1, *hidden.shape[1:]), 5.0, dtype=hidden.dtype))
    saved = {}

    def bottleneck(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        lamb = torch.sigmoid(alpha).expand(x.shape[0], x.shape[1], -1)
        mu = x * lamb
        var = (1 - lamb) ** 2
        saved["capacity"] = -0.5 * (1 + torch.log(var) - mu**2 - var)
        eps = mu.data.new(mu.size()).normal_()
        t = mu + var.sqrt() * eps
        return (t, *output[1:]) if isinstance(output, tuple) else t

    handle = tower.encoder.layers[layer].register_forward_hook(bottleneck)
    try:
        optimizer = torch.optim.Adam([alpha], lr=lr)
        model.eval()
        texts = text_ids.expand(num_noise, -1)
        images = image.expand(num_noise, -1, -1, -1)
        for _ in range(steps):
            optimizer.zero_grad()
            text_features = _features(model.get_text_features(texts))
            image_features = _features(model.get_image_features(images))
            compression = saved["capacity"].mean()
            fitting = F.cosine_similarity(text_features, image_features, eps=1e-6).mean()
            loss = beta * compression - fitting
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return torch.nansum(saved["capacity"].mean(0), -1).detach()


def _normalize(x):
    return (x - x.min()) / (x.max() - x.min())


def naive_m2ib(model, pixel_values, input_ids, *, vision_layer, text_layer, beta=0.1, steps=10, lr=1.0, num_noise=10, seed=0):
    """Maps of one pair: (image_map (H, W), text_map (L,), image_capacity (T,), text_capacity (L,))."""
    assert pixel_values.shape[0] == 1 and input_ids.shape[0] == 1
    kwargs = dict(beta=beta, steps=steps, lr=lr, num_noise=num_noise)
    torch.manual_seed(seed)
    text_capacity = _capacity_of_fit(model, model.text_model, text_layer, input_ids, pixel_values, **kwargs)
    torch.manual_seed(seed)
    image_capacity = _capacity_of_fit(model, model.vision_model, vision_layer, input_ids, pixel_values, **kwargs)

    patches = image_capacity[1:]
    side = int(patches.numel() ** 0.5)
    heat = F.interpolate(patches.reshape(1, 1, side, side), size=tuple(pixel_values.shape[-2:]), mode="bilinear")
    return _normalize(heat[0, 0]), _normalize(_normalize(text_capacity)), image_capacity, text_capacity
