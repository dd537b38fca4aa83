"""M2IB for answers on LLaVA: the fit term is the model's own log p(answer), the engine equals a naive per-sample
loop, batches do not change a sample's maps, samples do not talk to each other, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2ib_lightning.answers import attribute_answers, replaced_output
from m2ib_lightning.backbones.hf_llava import HFLlavaAnswerer
from m2ib_lightning.engine import M2IBConfig
from m2ib_lightning.shapes.models.shapes_llava import IMAGE, build_llava_tokenizer, build_shapes_llava
from m2ib_lightning.testing import BackboneCheckError, check_backbone, naive_answer_m2ib

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=16,
              patch_size=8, hidden_act="quick_gelu")


def tiny_llava(seed: int = 0, feature_layer: int = -1) -> HFLlavaAnswerer:
    tokenizer = build_llava_tokenizer()
    model = build_shapes_llava(tokenizer, VISION, width=32, layers=3, heads=2, vision_feature_layer=feature_layer, seed=seed)
    return HFLlavaAnswerer(model.double().eval())


def tiny_blip_vqa(seed: int = 0):
    from m2ib_lightning.backbones.hf_blip_vqa import HFBlipVQAAnswerer
    from m2ib_lightning.shapes.models.shapes_blip_vqa import build_shapes_blip_vqa, build_vqa_tokenizer

    model = build_shapes_blip_vqa(build_vqa_tokenizer(), image_size=16, patch_size=8, width=32, vision_layers=2,
                                  text_layers=2, heads=2, seed=seed)
    for module in model.modules():  # visible effects: BLIP's vision init (std 1e-10) leaves sites below float64 resolution
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    return HFBlipVQAAnswerer(model.double().eval())


def blip_inputs(seed: int = 0):
    """Two questions ([CLS] words [SEP]) of different lengths, the shorter right-padded; answers of 2 and 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(6, 30, (n,), generator=g).tolist()  # noqa: E731
    ids = torch.tensor([[2, *words(5), 3], [2, *words(2), 3, 0, 0, 0]])
    mask = (ids != 0).long()
    answers, answer_mask = torch.tensor([words(2), [words(1)[0], 0]]), torch.tensor([[1, 1], [1, 0]])
    return torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64), ids, mask, answers, answer_mask


QWEN_IMAGE, QWEN_START, QWEN_END = 5, 3, 4


def tiny_qwen2_vl(seed: int = 0):
    """A Qwen2-VL built from its config: a 2-block vision transformer (patch 4, 2x2 merger), a 2-layer language model
    with 3-D rotary positions, ids 0-6 its special tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from m2ib_lightning.backbones.hf_qwen2_vl import HFQwen2VLAnswerer

    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0}),
        image_token_id=QWEN_IMAGE, video_token_id=6, vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    torch.manual_seed(seed)
    return HFQwen2VLAnswerer(Qwen2VLForConditionalGeneration(config).double().eval())


def qwen_patches(image: torch.Tensor, patch: int = 4, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """A (3, H, W) image as Qwen2-VL's processor packs it: (patches, 3 * temporal * patch * patch), window by window."""
    c, h, w = image.shape
    frames = image[None].expand(temporal, -1, -1, -1)  # one picture fills the temporal patch twice
    x = frames.reshape(temporal, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
    return x.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(-1, c * temporal * patch * patch)


def qwen_inputs(seed: int = 0) -> dict:
    """Two non-square images of different sizes (16 x 24 and 8 x 16 px: 6 and 2 language-model tokens), prompts of
    different lengths (the shorter left-padded), answers of 2 and 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(7, 64, (n,), generator=g).tolist()  # noqa: E731
    images = [torch.randn(3, 16, 24, generator=g, dtype=torch.float64), torch.randn(3, 8, 16, generator=g, dtype=torch.float64)]
    grids = torch.tensor([[1, 4, 6], [1, 2, 4]])
    prompts = [[1, *words(2), QWEN_START, *[QWEN_IMAGE] * 6, QWEN_END, *words(3)], [1, QWEN_START, *[QWEN_IMAGE] * 2, QWEN_END, *words(1)]]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    return {"pixel_values": torch.cat([qwen_patches(i) for i in images]), "input_ids": ids, "attention_mask": mask,
            "answer_ids": torch.tensor([words(2), [words(1)[0], 0]]), "answer_mask": torch.tensor([[1, 1], [1, 0]]),
            "image_grid_thw": grids}


NAMES = ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask")

#: every registered adapter of a VLM that answers: a tiny model built from its config, and example inputs (a dict)
ANSWER_FAMILIES = {
    "hf_llava": (tiny_llava, lambda: dict(zip(NAMES, inputs()))),
    "hf_blip_vqa": (tiny_blip_vqa, lambda: dict(zip(NAMES, blip_inputs()))),
    "hf_qwen2_vl": (tiny_qwen2_vl, qwen_inputs),
}


def test_every_registered_answer_adapter_is_covered():
    from m2ib_lightning.backbones import BACKBONES

    from m2ib_lightning.backbones.base import HFAnswerLayout

    assert {n for n, f in BACKBONES.items() if isinstance(f, type) and issubclass(f, HFAnswerLayout)} == set(ANSWER_FAMILIES)


def inputs(seed: int = 0):
    """Two prompts of different lengths (the shorter left-padded) with 4 image tokens, answers of 1 and 2 tokens."""
    tokenizer = build_llava_tokenizer()
    image = tokenizer.convert_tokens_to_ids(IMAGE)
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(8, len(tokenizer), (n,), generator=g).tolist()  # noqa: E731
    prompts = [[2, *words(2), image, image, image, image, *words(3)], [2, *words(1), image, image, image, image, *words(1)]]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    answers = torch.tensor([[words(1)[0], 3], [words(1)[0], 0]])
    answer_mask = torch.tensor([[1, 1], [1, 0]])
    pixels = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    return pixels, ids, mask, answers, answer_mask


def own_log_likelihood(model, pixels, ids, mask, answers, answer_mask) -> torch.Tensor:
    """log p(answer) by the model's own forward, one sample at a time, padding removed."""
    out = []
    for b in range(len(ids)):
        prompt, answer = ids[b][mask[b].bool()], answers[b][answer_mask[b].bool()]
        sequence = torch.cat([prompt, answer])[None]
        logits = model.module(input_ids=sequence, pixel_values=pixels[b:b + 1]).logits[0]
        logp = F.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(answer)], dim=-1)
        out.append(logp.gather(1, answer[:, None]).sum())
    return torch.stack(out)


def test_with_lambda_at_one_the_fit_term_is_the_models_own_log_p_of_the_answer():
    model = tiny_llava()
    pixels, ids, mask, answers, answer_mask = inputs()
    batch = model.answer_batch(pixels, ids, mask, answers, answer_mask)
    with torch.no_grad():
        expected = own_log_likelihood(model, pixels, ids, mask, answers, answer_mask)
        torch.testing.assert_close(model.answer_log_likelihood(batch), expected, atol=1e-10, rtol=0)
        for modality in ("image", "text"):  # the block output put back unchanged (lambda = 1, no noise)
            block = model.blocks(modality)[1]
            captured = []
            with replaced_output(block, capture=captured):
                model.answer_log_likelihood(batch)
            with replaced_output(block, captured[0]):
                torch.testing.assert_close(model.answer_log_likelihood(batch), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("layer", [0, -1])
def test_the_engine_equals_a_naive_per_sample_loop_float64_for_both_fits(layer):
    model = tiny_llava(feature_layer=-1)
    pixels, ids, mask, answers, answer_mask = inputs()
    config = M2IBConfig(vision_layer=layer, text_layer=layer, steps=3, num_noise=2)
    result = attribute_answers(model, pixels, ids, mask, answers, answer_mask, config=config, seed=[11, 12])
    for b in range(2):
        one = (pixels[b:b + 1], ids[b:b + 1], mask[b:b + 1], answers[b:b + 1], answer_mask[b:b + 1])
        image = naive_answer_m2ib(model, *one, modality="image", layer=layer % 3, config=config, seed=11 + b)
        torch.testing.assert_close(result.image_capacity[b], image, atol=1e-10, rtol=0)
        text = naive_answer_m2ib(model, *one, modality="text", layer=layer % 3, config=config, seed=11 + b)
        columns = mask[b].bool().nonzero()[:, 0]
        torch.testing.assert_close(result.text_capacity[b, columns], text[: len(columns)], atol=1e-10, rtol=0)


def test_a_float64_reference_of_a_float32_fit_can_draw_the_float32_fits_noise():
    exact = tiny_llava()
    single = HFLlavaAnswerer(tiny_llava().module.float())
    pixels, ids, mask, answers, answer_mask = (t[:1] for t in inputs())
    config = M2IBConfig(vision_layer=0, text_layer=0, steps=3, num_noise=2)
    fit = lambda model, dtype=None, **kw: naive_answer_m2ib(  # noqa: E731
        model, pixels.to(dtype or pixels.dtype), ids, mask, answers, answer_mask, modality="image", layer=0, config=config,
        seed=3, **kw)
    float32 = fit(single, torch.float32).double()
    assert (fit(exact, noise_dtype=torch.float32) - float32).abs().max() < 1e-4  # the same noise: float32 rounding only
    assert (fit(exact) - float32).abs().max() > 1e-2  # float64's own stream: another fit


@pytest.mark.parametrize("family", ["hf_llava", "hf_qwen2_vl"])
def test_after_the_first_pass_only_the_blocks_after_the_bottleneck_run(family):
    """The explicit tail run: the first block of each tower runs in the clean pass and the first fit pass only (the
    text fit reads the input embeddings once), not at every step; the maps are the naive reference's (above)."""
    build, example_inputs = ANSWER_FAMILIES[family]
    model, example = build(), dict(example_inputs())
    args = [example.pop(k) for k in NAMES]
    runs = {"image": 0, "text": 0}
    handles = [model.blocks(m)[0].register_forward_hook(lambda *_, m=m: runs.__setitem__(m, runs[m] + 1)) for m in runs]
    try:
        attribute_answers(model, *args, config=M2IBConfig(vision_layer=1, text_layer=1, steps=5, num_noise=2), **example)
    finally:
        for handle in handles:
            handle.remove()
    # vision block 0: the image fit's clean pass and first pass, the text fit's input embeddings (once);
    # language-model layer 0: the image fit's clean pass and its 5 passes (the image changes), the text fit's 2
    assert runs == {"image": 3, "text": 2 + 5 + 2}


@pytest.mark.parametrize("family", list(ANSWER_FAMILIES))
def test_bf16_runs_the_model_after_the_bottleneck_in_bfloat16_and_stays_close_to_float32(family):
    """precision=bf16: the blocks after the bottleneck compute in bfloat16 (a vision block's matmuls in the image fit
    say so; the clean pass stays float32); capacities and fit terms are float32, near float32's, not equal to them.
    (Near-tied capacities of random tiny models rank by rounding: the benchmark measures ranks on trained models.)"""
    build, example_inputs = ANSWER_FAMILIES[family]
    model, example = build(), {k: v.float() if v.is_floating_point() else v for k, v in example_inputs().items()}
    model.module.float()
    args = [example.pop(k) for k in NAMES]
    results, dtypes = {}, []
    linear = next(m for m in model.blocks("image")[1].modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    try:
        for precision in ("32", "bf16"):
            config = M2IBConfig(vision_layer=0, text_layer=1, steps=4, num_noise=3, precision=precision)
            dtypes.clear()
            results[precision] = attribute_answers(model, *args, config=config, seed=[3, 4], **example)
            assert (torch.bfloat16 in dtypes) == (precision == "bf16") and torch.float32 in dtypes
    finally:
        handle.remove()
    full, low = results["32"], results["bf16"]
    for name in ("image_capacity", "text_capacity", "image_fit", "text_fit"):
        assert getattr(low, name).dtype == torch.float32
        assert not torch.equal(getattr(low, name), getattr(full, name)), name
    torch.testing.assert_close(low.image_fit, full.image_fit, atol=0, rtol=0.05)  # log p(answer), bf16 matmuls
    torch.testing.assert_close(low.text_fit, full.text_fit, atol=0, rtol=0.05)
    torch.testing.assert_close(low.image_capacity, full.image_capacity, atol=0, rtol=0.1)
    torch.testing.assert_close(low.text_capacity, full.text_capacity, atol=0, rtol=0.1)  # zero where float32's is


def test_padding_image_tokens_and_the_answer_get_no_capacity_and_a_batch_gives_each_sample_its_solo_maps():
    model = tiny_llava()
    pixels, ids, mask, answers, answer_mask = inputs()
    config = M2IBConfig(vision_layer=0, text_layer=1, steps=3, num_noise=2)
    both = attribute_answers(model, pixels, ids, mask, answers, answer_mask, config=config, seed=[5, 6])
    image_token = model.config.image_token_id
    assert bool((both.text_capacity[ids == image_token] == 0).all()) and bool((both.text_capacity[mask == 0] == 0).all())
    assert bool((both.text_capacity[(mask == 1) & (ids != image_token)] > 0).all())
    assert both.text_capacity.shape == ids.shape and both.image_capacity.shape == (2, 5) and both.image_maps.shape == (2, 16, 16)
    for b in range(2):
        alone = attribute_answers(model, pixels[b:b + 1], ids[b:b + 1], mask[b:b + 1], answers[b:b + 1],
                                  answer_mask[b:b + 1], config=config, seed=5 + b)
        torch.testing.assert_close(alone.image_capacity[0], both.image_capacity[b], atol=1e-10, rtol=0)
        torch.testing.assert_close(alone.text_capacity[0], both.text_capacity[b], atol=1e-10, rtol=0)


def test_no_cross_talk_and_the_model_untouched_also_after_an_error():
    model = tiny_llava()
    pixels, ids, mask, answers, answer_mask = inputs()
    batch = model.answer_batch(pixels, ids, mask, answers, answer_mask)
    block = model.blocks("text")[1]
    captured = []
    with torch.no_grad(), replaced_output(block, capture=captured):
        model.answer_log_likelihood(batch)
    hidden = captured[0].detach().requires_grad_(True)
    with replaced_output(block, hidden):
        (grad,) = torch.autograd.grad(model.answer_log_likelihood(batch)[0], [hidden])
    assert bool(grad[0].ne(0).any()) and bool(grad[1:].eq(0).all())  # exactly zero across samples

    module = model.module
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    hooks = {name: list(m._forward_hooks.values()) for name, m in module.named_modules()}  # transformers' own, installed once
    config = M2IBConfig(vision_layer=0, text_layer=0, steps=2, num_noise=2)
    attribute_answers(model, pixels, ids, mask, answers, answer_mask, config=config)
    original = model.answer_log_likelihood

    def failing(batch, copies=1):
        if copies > 1:
            raise RuntimeError("inside the fit")
        return original(batch, copies)

    model.answer_log_likelihood = failing
    with pytest.raises(RuntimeError, match="inside the fit"):
        attribute_answers(model, pixels, ids, mask, answers, answer_mask, config=config)
    del model.answer_log_likelihood
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags and module.training
    assert all(p.grad is None for p in module.parameters())
    assert {name: list(m._forward_hooks.values()) for name, m in module.named_modules()} == hooks


def test_an_image_bottleneck_after_the_block_llava_reads_is_refused():
    model = tiny_llava(feature_layer=-2)  # reads block 1's output of 3
    pixels, ids, mask, answers, answer_mask = inputs()
    with pytest.raises(ValueError, match="vision_layer=2 is block 2, after block 1"):
        attribute_answers(model, pixels, ids, mask, answers, answer_mask, config=M2IBConfig(vision_layer=2, text_layer=0, steps=1))
    model.resolve_layer("image", 1, "vision_layer")  # the block it reads is allowed


def test_llava_reading_several_vision_blocks_is_explained_exactly_below_the_earliest_and_refused_after_it():
    model = tiny_llava(feature_layer=[1, -1])  # block 0's and block 2's outputs, concatenated per token
    pixels, ids, mask, answers, answer_mask = inputs()
    config = M2IBConfig(vision_layer=0, text_layer=1, steps=3, num_noise=2)
    result = attribute_answers(model, pixels, ids, mask, answers, answer_mask, config=config, seed=[5, 6])
    for b in range(2):
        one = (pixels[b:b + 1], ids[b:b + 1], mask[b:b + 1], answers[b:b + 1], answer_mask[b:b + 1])
        image = naive_answer_m2ib(model, *one, modality="image", layer=0, config=config, seed=5 + b)
        torch.testing.assert_close(result.image_capacity[b], image, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match=r"vision_layer=1 is block 1, after block 0.*vision_feature_layer=\[1, -1\]"):
        attribute_answers(model, pixels, ids, mask, answers, answer_mask, config=M2IBConfig(vision_layer=1, text_layer=0, steps=1))


def test_the_front_door_explains_given_answers_or_the_models_own_greedy_ones():
    from m2ib_lightning import attribute
    from conftest import tiny_clip

    model = tiny_llava()
    pixels, ids, mask, answers, answer_mask = inputs()
    settings = dict(vision_layer=0, text_layer=1, steps=2, num_noise=2, seed=3)
    given = attribute(model.module, pixels, ids, mask, answer_ids=answers, answer_mask=answer_mask, **settings)
    direct = attribute_answers(model, pixels, ids, mask, answers, answer_mask,
                               config=M2IBConfig(vision_layer=0, text_layer=1, steps=2, num_noise=2), seed=3)
    torch.testing.assert_close(given.image_capacity, direct.image_capacity, atol=0, rtol=0)
    own = attribute(model.module, pixels, ids, mask, max_new_tokens=2, **settings)
    for b in range(2):  # the greedy answer, token by token, from the model's own logits
        prompt = ids[b][mask[b].bool()][None]
        first = model.module(input_ids=prompt, pixel_values=pixels[b:b + 1]).logits[0, -1].argmax()
        if first != model.config.text_config.eos_token_id:
            assert own.answer_ids[b, 0] == first and own.answer_mask[b, 0] == 1
    with pytest.raises(ValueError, match="does not answer questions"):
        attribute(tiny_clip(seed=0), pixels.float(), ids, mask, answer_ids=answers)


@pytest.mark.parametrize("family", list(ANSWER_FAMILIES))
def test_check_backbone_passes_every_answer_adapter_and_names_a_broken_property(family):
    build, example_inputs = ANSWER_FAMILIES[family]
    model = build()
    example = example_inputs()
    probing = ["probing"]  # every answer family declares probe sites
    assert check_backbone(model, example) == ["no cross-talk", "batch invariance", "model untouched", "naive reference",
                                              "answer attention", *probing]

    class Leaky(type(model)):  # the batch's mean log p leaks into every sample's score
        def answer_log_likelihood(self, batch, copies=1):
            scores = super().answer_log_likelihood(batch, copies)
            return scores + 1e-3 * scores.mean()

    with pytest.raises(BackboneCheckError, match="^no cross-talk"):
        check_backbone(Leaky(model.module), example)


def test_check_backbone_names_an_attention_graph_entry_the_answer_never_passes_through():
    build, example_inputs = ANSWER_FAMILIES["hf_llava"]
    model = build()

    class Unrun(type(model)):
        def attention_graph(self):
            return [*super().attention_graph(), (torch.nn.Identity(), "sequence", "sequence")]

    with pytest.raises(BackboneCheckError, match="^answer attention: the attention graph's 4 modules were called 3 times"):
        check_backbone(Unrun(model.module), example_inputs())


def test_on_the_shipped_blip_vqa_m2ib_points_at_the_object_a_question_is_about():
    """The image map of M2IB explaining the right answer, against the questioned object's mask: far above random."""
    from conftest import answer_localisation

    hits, chance = answer_localisation("builtin:shapes-blip-vqa", ("colour", "shape", "what_colour", "what_shape"), 8,
                                       vision_layer=0, text_layer=1, steps=5, num_noise=4)
    error = hits.std() / len(hits) ** 0.5
    print(f"\npointing game of M2IB on answers, shipped BLIP VQA: {hits.mean():.3f} +- {error:.3f}; random {chance.mean():.3f}")
    assert hits.mean() - chance.mean() > 2 * error and hits.mean() >= 0.6


def test_qwen2_vl_pictures_are_packed_as_its_processor_packs_them_and_explained_alike():
    """(B, 3, H, W) pictures (what the baselines and metrics perturb) packed by the adapter: the processor's layout,
    and the same log p(answer) and maps as the packed inputs."""
    from m2ib_lightning.backbones.hf_qwen2_vl import pack_pictures

    model = tiny_qwen2_vl()
    g = torch.Generator().manual_seed(3)
    pictures = torch.randn(2, 3, 16, 24, generator=g, dtype=torch.float64)
    packed, grid = pack_pictures(pictures, merge=2, patch=4, temporal=2)
    torch.testing.assert_close(packed, torch.cat([qwen_patches(p) for p in pictures]), atol=0, rtol=0)
    assert grid.tolist() == [[1, 4, 6], [1, 4, 6]]
    cells = torch.arange(24).view(2, 2, 3, 2).permute(0, 2, 1, 3).flatten()  # packed position -> raster cell
    assert torch.equal(model.raster_patches(cells.repeat(2), pictures), torch.arange(24).expand(2, -1))  # the baselines' order
    example = qwen_inputs()
    prompt = example["input_ids"][0][example["attention_mask"][0].bool()]
    ids, mask = prompt.repeat(2, 1), torch.ones(2, len(prompt), dtype=torch.long)
    answers = {"answer_ids": example["answer_ids"][[0, 0]], "answer_mask": example["answer_mask"][[0, 0]]}
    with torch.no_grad():
        from_pictures = model.answer_log_likelihood(model.answer_batch(pictures, ids, mask, **answers))
        from_packed = model.answer_log_likelihood(model.answer_batch(packed, ids, mask, **answers, image_grid_thw=grid))
    assert torch.equal(from_pictures, from_packed) and not torch.equal(from_pictures[0], from_pictures[1])
    config = M2IBConfig(vision_layer=0, text_layer=1, steps=2, num_noise=2)
    a = attribute_answers(model, pictures, ids, mask, **answers, config=config, seed=[1, 2])
    b = attribute_answers(model, packed, ids, mask, **answers, config=config, seed=[1, 2], image_grid_thw=grid)
    assert torch.equal(a.image_maps, b.image_maps) and torch.equal(a.text_capacity, b.text_capacity)
    with pytest.raises(ValueError, match="multiple of patch_size x spatial_merge_size = 8"):
        model.answer_batch(pictures[..., :20], ids, mask, **answers)
    with pytest.raises(ValueError, match="pass no image_grid_thw"):
        model.answer_batch(pictures, ids, mask, **answers, image_grid_thw=grid)


def test_qwen2_vl_inputs_here_are_packed_as_its_processor_packs_them():
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=4096,
                                         do_normalize=False, do_rescale=False)
    picture = np.random.RandomState(0).randint(0, 255, (16, 24, 3)).astype(np.uint8)
    out = processor(images=Image.fromarray(picture), return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]  # not resized to a square
    torch.testing.assert_close(out["pixel_values"].double(), qwen_patches(torch.tensor(picture).permute(2, 0, 1).double()),
                               atol=0, rtol=0)


def test_qwen2_vl_fit_term_at_lambda_one_is_its_own_log_p_and_maps_keep_each_images_aspect_ratio():
    model = tiny_qwen2_vl()
    example = qwen_inputs()
    batch = model.answer_batch(**example)
    with torch.no_grad():
        expected = []
        for b in range(2):  # the model's own forward on one sample, positions computed by the model itself
            one = model.sample_inputs(example, b)
            prompt, answer = one["input_ids"][0][one["attention_mask"][0].bool()], one["answer_ids"][0][one["answer_mask"][0].bool()]
            sequence = torch.cat([prompt, answer])[None]
            logits = model.module(input_ids=sequence, pixel_values=one["pixel_values"], image_grid_thw=one["image_grid_thw"],
                                  mm_token_type_ids=(sequence == QWEN_IMAGE).int()).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(answer)], dim=-1)
            expected.append(logp.gather(1, answer[:, None]).sum())
        torch.testing.assert_close(model.answer_log_likelihood(batch), torch.stack(expected), atol=1e-10, rtol=0)
    config = M2IBConfig(vision_layer=0, text_layer=1, steps=2, num_noise=2)
    result = attribute_answers(model, **example, config=config, seed=[1, 2])
    assert result.image_sizes.tolist() == [[16, 24], [8, 16]] and result.image_maps.shape == (2, 16, 24)
    assert result.image_map(0).shape == (16, 24) and result.image_map(1).shape == (8, 16)
    assert bool((result.image_maps[1, 8:] == 0).all()) and bool((result.image_maps[1, :, 16:] == 0).all())
    assert result.image_capacity.shape == (2, 24) and bool((result.image_capacity[1, 8:] == 0).all())
    ids = example["input_ids"]
    assert bool((result.text_capacity[ids == QWEN_IMAGE] == 0).all()) and bool((result.text_capacity[example["attention_mask"] == 0] == 0).all())
    assert bool((result.text_capacity[(example["attention_mask"] == 1) & (ids != QWEN_IMAGE)] > 0).all())


@pytest.mark.parametrize("cell", [(0, 5), (3, 1)])
def test_qwen2_vl_a_patch_moved_in_the_input_moves_the_map(cell):
    """One patch far brighter than the rest: its vision-block output is the outlier, so it holds the most capacity,
    and the map peaks on it wherever it is put (the packed window order undone)."""
    from m2ib_lightning import attribute

    model = tiny_qwen2_vl()
    example = qwen_inputs()
    picture = torch.zeros(3, 16, 24, dtype=torch.float64)
    row, col = cell
    picture[:, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = 8.0
    one = model.sample_inputs(example, 0)
    one["pixel_values"] = qwen_patches(picture)
    answer = {"answer_ids": one.pop("answer_ids"), "answer_mask": one.pop("answer_mask")}
    result = attribute(model.module, **one, **answer, vision_layer=0, text_layer=0, steps=1, num_noise=1, seed=0)
    capacity = result.image_capacity[0]
    cells = torch.arange(24).view(2, 2, 3, 2).permute(0, 2, 1, 3).flatten()  # packed position -> raster cell
    assert int(cells[capacity.argmax()]) == row * 6 + col
    peak = divmod(int(result.image_map(0).argmax()), 24)
    assert peak[0] // 4 == row and peak[1] // 4 == col


def test_qwen2_vl_refuses_inputs_that_do_not_fit_and_explains_its_greedy_answer():
    from m2ib_lightning import attribute

    model = tiny_qwen2_vl()
    example = qwen_inputs()
    settings = dict(vision_layer=-1, text_layer=0, steps=1, num_noise=1)
    without = {k: v for k, v in example.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match="image_grid_thw is needed"):
        attribute(model.module, **without, **settings)
    with pytest.raises(ValueError, match="one .t, rows, cols. row per question"):
        attribute(model.module, **{**example, "image_grid_thw": example["image_grid_thw"][:1]}, **settings)
    with pytest.raises(ValueError, match="pixel_values holds 31 patches"):
        attribute(model.module, **{**example, "pixel_values": example["pixel_values"][1:]}, **settings)
    own = attribute(model.module, **{k: v for k, v in example.items() if not k.startswith("answer")}, max_new_tokens=2, **settings)
    for b in range(2):
        one = model.sample_inputs(example, b)
        prompt = one["input_ids"][0][one["attention_mask"][0].bool()][None]
        logits = model.module(input_ids=prompt, pixel_values=one["pixel_values"], image_grid_thw=one["image_grid_thw"],
                              mm_token_type_ids=(prompt == QWEN_IMAGE).int()).logits[0, -1]
        if int(logits.argmax()) != 2:  # not EOS: the first answer token is the argmax
            assert own.answer_ids[b, 0] == logits.argmax() and own.answer_mask[b, 0] == 1


@pytest.mark.parametrize("family", ["hf_llava", "hf_qwen2_vl"])
def test_the_last_language_model_layer_runs_only_at_the_answer_predicting_positions_with_the_same_numbers(family, monkeypatch):
    """log p(answer) with the last layer computed at the score rows (layer_at_rows) = the model's own whole layer
    (float64, 1e-10, padded batch); the whole layer never runs, unless something observes it; the fits agree."""
    model, example = (tiny_llava(), dict(zip(("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_mask"),
                                             inputs()))) if family == "hf_llava" else (tiny_qwen2_vl(), qwen_inputs())
    batch = model.answer_batch(**example)
    last = model.blocks("text")[-1]
    whole_calls = []
    original = type(last).forward
    monkeypatch.setattr(type(last), "forward", lambda self, *a, **k: (whole_calls.append(self is last), original(self, *a, **k))[1])
    with torch.no_grad():
        with replaced_output(last, capture=[]):  # observed: the whole layer, the model's own numbers
            whole = model.answer_log_likelihood(batch, 2)
        assert any(whole_calls)
        whole_calls.clear()
        rows_only = model.answer_log_likelihood(batch, 2)
    assert not any(whole_calls) and len(batch.score_positions) < batch.inputs["input_ids"].shape[1] // 2
    torch.testing.assert_close(rows_only, whole, atol=1e-10, rtol=0)
    config = M2IBConfig(vision_layer=0, text_layer=0, steps=3, num_noise=2)
    fast = attribute_answers(model, **example, config=config, seed=[1, 2])
    with replaced_output(last, capture=[]):
        slow = attribute_answers(model, **example, config=config, seed=[1, 2])
    for name in ("image_capacity", "text_capacity", "image_fit", "text_fit"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), atol=1e-10, rtol=0)
