"""Activation patching of decoder VLMs (LLaVA, Qwen2-VL) through their family adapters: the language model's
residual stream, attention output, query heads and MLP, and the vision towers (Qwen2-VL's packed patches); the
sanity properties of
activation patching, batched equals one cell at a time, hooks undone."""

from __future__ import annotations

import pytest
import torch

from m2ib_lightning.backbones.hf_qwen2_vl import pack_pictures
from m2ib_lightning.probing import ActivationPatching
from test_answers import inputs, qwen_inputs, tiny_llava, tiny_qwen2_vl

SITES = ("resid", "attn", "head", "mlp")


def llava_pairs():
    """The prompt of sample 0 (4 image tokens after 3 text tokens) with two pictures, and with one word changed."""
    pixels, ids, mask, _, _ = inputs()
    prompt = ids[:1, mask[0].bool()]
    text = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    changed = prompt.clone()
    changed[0, -2] = changed[0, -2] % 20 + 8
    image = ({"pixel_values": pixels[:1], **text}, {"pixel_values": pixels[1:], **text})
    return image, ({"pixel_values": pixels[:1], **text}, {"pixel_values": pixels[:1], "input_ids": changed,
                                                           "attention_mask": text["attention_mask"]})


def qwen_pairs():
    """qwen_inputs' first prompt (6 image tokens of a 16 x 24 picture after 3 text tokens) with two pictures packed as
    the processor packs them, and with one word changed."""
    example = qwen_inputs()
    prompt = example["input_ids"][:1, example["attention_mask"][0].bool()]
    g = torch.Generator().manual_seed(2)
    pictures = torch.randn(2, 3, 16, 24, generator=g, dtype=torch.float64)
    (a, grid), (b, _) = (pack_pictures(p[None], 2, 4, 2) for p in pictures)
    text = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "image_grid_thw": grid}
    changed = prompt.clone()
    changed[0, -2] = changed[0, -2] % 50 + 7
    return ({"pixel_values": a, **text}, {"pixel_values": b, **text}), \
        ({"pixel_values": a, **text}, {"pixel_values": a, **{**text, "input_ids": changed}})


FAMILIES = {"hf_llava": (tiny_llava, llava_pairs), "hf_qwen2_vl": (tiny_qwen2_vl, qwen_pairs)}
ANSWERS = (9, 13)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, pairs = FAMILIES[request.param]
    return request.param, build(), pairs()


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("modality", ["image", "text"])
def test_self_patching_changes_nothing_and_the_last_layers_residual_restores_either_score(family, modality):
    _, model, (image, text) = family
    clean, corrupt = image if modality == "image" else text
    probe = ActivationPatching(model)
    same = probe.run(clean, clean, answers=ANSWERS, modality=modality, site="resid")
    assert same.flagged and bool((same.patched_ld == same.clean_ld).all())
    for direction in ("denoise", "noise"):
        result = probe.run(clean, corrupt, answers=ANSWERS, modality=modality, site="resid", positions="all",
                           direction=direction)
        assert not result.flagged
        torch.testing.assert_close(result.effect[-1], torch.ones(1, dtype=result.effect.dtype), atol=1e-10, rtol=0)
        if modality == "image":  # the vision tower's last probed block carries the whole image to the language model
            vision = probe.run(clean, corrupt, answers=ANSWERS, modality="image", site="resid", positions="all",
                               direction=direction, tower="vision")
            torch.testing.assert_close(vision.effect[-1], torch.ones(1, dtype=vision.effect.dtype), atol=1e-10, rtol=0)


def test_with_the_image_corrupted_positions_before_the_first_image_token_have_no_effect(family):
    name, model, (image, _) = family
    clean, corrupt = image
    first = int((clean["input_ids"][0] == model.image_token_id).nonzero()[0])
    for site in SITES:
        result = ActivationPatching(model).run(clean, corrupt, answers=ANSWERS, modality="image", site=site)
        effect = result.effect if site != "head" else result.effect.abs().amax(-1)
        assert effect.shape[1] == clean["input_ids"].shape[1], site
        assert bool((effect[:, :first] == 0).all()), site  # the same tokens, causally before the image: exact 0
        assert float(effect[:, first:].abs().sum()) > 0, site


def test_a_head_is_its_slice_before_o_proj_and_all_heads_equal_the_attention_output(family):
    """Head h's context vectors, rebuilt from the layer's attention probabilities and its values (grouped-query
    attention: the key/value group h // (heads / kv heads)), are dimensions [h*d, (h+1)*d) of o_proj's input; patching
    the attention output after o_proj at a position equals patching every head there."""
    name, model, (image, _) = family
    clean, corrupt = image
    probe = ActivationPatching(model)
    config = model.config.text_config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    layer = 1
    block = model.blocks("text")[layer]
    taken = {}
    take = lambda key: (lambda module, args, out: taken.__setitem__(key, out))  # noqa: E731
    handles = [block.self_attn.v_proj.register_forward_hook(take("v")),
               block.self_attn.o_proj.register_forward_pre_hook(lambda m, args: taken.__setitem__("context", args[0]))]
    try:
        probs = model.head_attention("language", clean)[layer][0]  # (heads, T, T)
    finally:
        for handle in handles:
            handle.remove()
    d = taken["context"].shape[-1] // heads
    values = taken["v"][0].view(-1, groups, d)
    for h in range(heads):
        rebuilt = probs[h] @ values[:, h // (heads // groups)]
        torch.testing.assert_close(taken["context"][0, :, h * d:(h + 1) * d], rebuilt, atol=1e-10, rtol=0)
    whole = probe.run(clean, corrupt, answers=ANSWERS, modality="image", site="attn")
    each = probe.run(clean, corrupt, answers=ANSWERS, modality="image", site="head")
    assert each.effect.shape[-1] == heads
    cache: list[torch.Tensor] = []
    source = model.probe_site("language", "attn", layer).module
    with torch.no_grad():
        handle = source.register_forward_hook(lambda m, a, out: cache.append(out.clone()))
        try:
            model.decision_logits(clean, 1, "language")
        finally:
            handle.remove()
    position = clean["input_ids"].shape[1] - 1

    def after_o_proj(module, args, out):
        out = out.clone()
        out[0, position] = cache[0][0, position]
        return out

    with torch.no_grad():
        handle = source.register_forward_hook(after_o_proj)
        try:
            _, ld = probe._scores(model.decision_logits(corrupt, 1, "language"), ANSWERS)
        finally:
            handle.remove()
    torch.testing.assert_close(ld[0].double(), whole.patched_ld[layer, position].double(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_batched_cells_equal_one_cell_at_a_time_for_every_site(family, modality):
    name, model, (image, text) = family
    clean, corrupt = image if modality == "image" else text
    towers = [("language", site) for site in SITES] + [("vision", site) for site in model.probe_sites("vision")
                                                        if "vision" in model.probe_towers and modality == "image"]
    for tower, site in towers:
        batched = ActivationPatching(model, batch_size=64).run(clean, corrupt, answers=ANSWERS, modality=modality,
                                                               site=site, tower=tower)
        single = ActivationPatching(model, batch_size=1).run(clean, corrupt, answers=ANSWERS, modality=modality,
                                                             site=site, tower=tower)
        torch.testing.assert_close(batched.patched_ld, single.patched_ld, atol=1e-10, rtol=0, msg=f"{tower} {site}")
        assert float(batched.effect.abs().sum()) > 0, (tower, site)
        model.decision_prefix = None  # every batch from position 0: the key/value cache of the prefix changes nothing
        try:
            whole = ActivationPatching(model, batch_size=5).run(clean, corrupt, answers=ANSWERS, modality=modality,
                                                                 site=site, tower=tower)
        finally:
            del model.decision_prefix
        torch.testing.assert_close(batched.patched_ld, whole.patched_ld, atol=1e-10, rtol=0, msg=f"{tower} {site}")


def test_hooks_are_gone_after_a_run_and_after_an_error(family):
    _, model, (image, _) = family
    clean, corrupt = image
    before = _hook_count(model.module)
    ActivationPatching(model).run(clean, corrupt, answers=ANSWERS, modality="image", site="head", positions="all")
    assert _hook_count(model.module) == before
    probe = ActivationPatching(model)
    calls = {"n": 0}
    original = model.decision_logits

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    model.decision_logits = failing
    try:
        with pytest.raises(RuntimeError, match="boom"):
            probe.run(clean, corrupt, answers=ANSWERS, modality="image", site="mlp")
    finally:
        del model.decision_logits
    assert _hook_count(model.module) == before


def test_the_pooled_position_is_the_prompts_last_which_predicts_the_answer(family):
    _, model, (image, _) = family
    clean, corrupt = image
    probe = ActivationPatching(model)
    pooled = probe.run(clean, corrupt, answers=ANSWERS, modality="image", site="resid", positions="pooled")
    each = probe.run(clean, corrupt, answers=ANSWERS, modality="image", site="resid")
    torch.testing.assert_close(pooled.patched_ld[:, 0], each.patched_ld[:, -1], atol=1e-10, rtol=0)


def test_answer_words_of_several_tokens_are_decided_at_their_first_differing_token():
    from types import SimpleNamespace

    from m2ib_lightning.tasks.probe_vqa import decision_tokens

    pieces = {"blue": [7, 8], "black": [7, 9], "red": [5]}
    decoder = SimpleNamespace(answer_inputs=pieces.__getitem__, image_token_id=3)
    assert decision_tokens(decoder, "blue", "black") == ([7], (8, 9))  # "bl" read after the prompt, then decided
    assert decision_tokens(decoder, "red", "blue") == ([], (5, 7))
    with pytest.raises(ValueError, match="start with the same token"):
        decision_tokens(SimpleNamespace(answer_inputs=pieces.__getitem__), "blue", "black")  # BLIP: the first step
    with pytest.raises(ValueError, match="no token where they differ"):
        decision_tokens(decoder, "blue", "blue")


def test_qwen2_vl_vision_heads_are_slices_before_proj_and_their_attention_is_rebuilt_over_the_image():
    """Qwen2-VL's vision attention returns no probabilities: those head_attention rebuilds (rotary queries and keys)
    times the values of qkv are dimensions [h*d, (h+1)*d) of proj's input; image_keys puts the packed patches back in
    raster order; one cell per packed patch, each reaching the decision."""
    model = tiny_qwen2_vl()
    (clean, corrupt), _ = qwen_pairs()
    heads = model.probe_site("vision", "self_head", 0).heads
    taken = {}
    block = model.blocks("image")[1]
    handles = [block.attn.qkv.register_forward_hook(lambda m, a, out: taken.__setitem__("qkv", out)),
               block.attn.proj.register_forward_pre_hook(lambda m, args: taken.__setitem__("context", args[0]))]
    try:
        probs = model.head_attention("vision", clean)
    finally:
        for handle in handles:
            handle.remove()
    patches = clean["pixel_values"].shape[0]
    assert len(probs) == model.probe_layers("vision") and probs[1].shape == (1, heads, patches, patches)
    values = taken["qkv"].view(patches, 3, heads, -1)[:, 2]
    d = values.shape[-1]
    for h in range(heads):
        torch.testing.assert_close(taken["context"][:, h * d:(h + 1) * d], probs[1][0, h] @ values[:, h], atol=1e-10, rtol=0)
    keys, (rows, cols) = model.image_keys("vision", clean)
    assert (rows, cols) == (4, 6)
    raster = torch.arange(rows * cols).view(rows // 2, 2, cols // 2, 2).permute(0, 2, 1, 3).flatten()
    assert bool((raster[keys] == torch.arange(rows * cols)).all())  # raster cell c sits at packed position keys[c]
    result = ActivationPatching(model).run(clean, corrupt, answers=ANSWERS, modality="image", site="mlp", tower="vision")
    assert result.effect.shape == (model.probe_layers("vision"), patches)
    assert float(result.effect[0].abs().min()) > 0  # every patch's own MLP output reaches the decision
