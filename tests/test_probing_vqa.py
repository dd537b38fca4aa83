"""Activation patching of BLIP VQA: NOTICE's numbers, the sanity properties, heads, batching, pairs."""

from __future__ import annotations

import json

import pytest
import torch

from m2ib_lightning.backbones.hf_blip_vqa import HFBlipVQAAnswerer
from m2ib_lightning.shapes.models.shapes_blip_vqa import build_shapes_blip_vqa, build_vqa_tokenizer
from m2ib_lightning.probing import (
    ActivationPatching,
    read_vqa_pairs,
    symmetric_token_replacement,
)
from m2ib_lightning.probing.patching import site_hooks
from notice_reference import trace_important_states

SITES = ("resid", "mlp", "self_attn", "cross_attn", "self_head", "cross_head")


@pytest.fixture(scope="module")
def tokenizer():
    return build_vqa_tokenizer()


def tiny_blip_vqa(tokenizer, seed: int = 0):
    model = build_shapes_blip_vqa(tokenizer, image_size=32, width=32, vision_layers=2, text_layers=3, heads=4, seed=seed)
    for module in model.modules():  # a random model with visible effects: larger weights than the tiny default init
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    return model.eval().double()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_blip_vqa(tokenizer)


def _inputs(tokenizer, question: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    encoded = tokenizer(question, return_tensors="pt")
    return {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64),
            "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.fixture(scope="module")
def image_pair(tokenizer):
    clean = _inputs(tokenizer, "is the circle red or blue?", 1)
    corrupt = {**clean, "pixel_values": _inputs(tokenizer, "x", 2)["pixel_values"]}
    return clean, corrupt, (tokenizer.convert_tokens_to_ids("red"), tokenizer.convert_tokens_to_ids("blue"))


@pytest.fixture(scope="module")
def text_pair(tokenizer):
    clean = _inputs(tokenizer, "is the circle red or blue?", 1)
    corrupt = {**clean, "input_ids": tokenizer("is the square red or blue?", return_tensors="pt")["input_ids"]}
    return clean, corrupt, (tokenizer.convert_tokens_to_ids("red"), tokenizer.convert_tokens_to_ids("blue"))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind,site,head", [(None, "resid", None), ("crossattention_block", "cross_head", 1),
                                            ("attention_block", "self_head", 2), ("crossattention_block", "cross_attn", None)])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_equals_notice_trace_important_states(model, image_pair, text_pair, modality, kind, site, head):
    clean, corrupt, answers = image_pair if modality == "image" else text_pair
    reference = trace_important_states(model, clean, corrupt, answers, modality, num_layers=3, kind=kind, attn_head=head)
    result = ActivationPatching(model).run(clean, corrupt, answers=answers, modality=modality, site=site)
    ours = [result.patched_prob, result.prob_difference, result.ld_difference, result.effect]
    if head is not None:
        ours = [t[..., head] for t in ours]
    ours = torch.stack([t.t() for t in ours], dim=-1)  # (tokens, layers, 4), as NOTICE's table
    torch.testing.assert_close(ours.double(), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("modality", ["image", "text"])
def test_patching_the_clean_run_into_itself_changes_nothing(model, image_pair, text_pair, site, modality):
    clean, _, answers = image_pair if modality == "image" else text_pair
    result = ActivationPatching(model).run(clean, clean, answers=answers, modality=modality, site=site)
    torch.testing.assert_close(result.patched_ld, torch.full_like(result.patched_ld, result.clean_ld), atol=1e-9, rtol=0)
    assert result.flagged and torch.isnan(result.effect).all()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_last_layer_residual_everywhere_gives_effect_one_both_ways(model, image_pair, text_pair, modality):
    clean, corrupt, answers = image_pair if modality == "image" else text_pair
    probe = ActivationPatching(model)
    for direction in ("denoise", "noise"):
        result = probe.run(clean, corrupt, answers=answers, modality=modality, site="resid", positions="all", direction=direction)
        assert not result.flagged
        torch.testing.assert_close(result.effect[-1], torch.ones(1, dtype=result.effect.dtype), atol=1e-9, rtol=0)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_image_corruption_cannot_reach_layer_0_self_attention(model, image_pair, direction):
    clean, corrupt, answers = image_pair
    probe = ActivationPatching(model)
    for site in ("self_attn", "self_head"):
        result = probe.run(clean, corrupt, answers=answers, modality="image", site=site, direction=direction)
        assert torch.all(result.effect[0] == 0), site  # a patch that does nothing scores 0, also when noising
        assert result.effect[1:].abs().sum() > 0, site


def test_all_heads_at_a_cell_equal_the_whole_attention_block(model, image_pair):
    clean, corrupt, answers = image_pair
    probe = ActivationPatching(model)
    whole = probe.run(clean, corrupt, answers=answers, modality="image", site="cross_attn")
    adapter = probe.adapter
    sites = [adapter.probe_site("text", "cross_head", layer) for layer in range(3)]
    cache = probe._cache(sites, clean, "text")
    heads, width = 4, 32 // 4
    for layer, position in [(1, 2), (2, 5)]:
        def edit(at, act, layer=layer, position=position):
            if at == layer:
                for h in range(heads):
                    act[0, position, h * width : (h + 1) * width] = cache[layer][position, h * width : (h + 1) * width]

        with site_hooks(sites, edit), torch.no_grad():
            _, ld = probe._scores(adapter.decision_logits(corrupt, 1, "text"), answers)
        torch.testing.assert_close(ld[0], whole.patched_ld[layer, position], atol=1e-10, rtol=0)


def test_head_h_is_its_slice_of_the_context(model, image_pair):
    """Head h's attention, computed from the module's weights, is dimensions [h*d, (h+1)*d) of the site."""
    clean, _, _ = image_pair
    attention = model.text_encoder.encoder.layer[1].crossattention.self
    seen = {}
    handle = attention.register_forward_hook(lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out), with_kwargs=True)
    try:
        with torch.no_grad():
            HFBlipVQAAnswerer(model).decision_logits(clean, 1, "text")
    finally:
        handle.remove()
    hidden, image = seen["args"][0], seen["kwargs"]["encoder_hidden_states"]
    d = attention.attention_head_size
    for h in range(attention.num_attention_heads):
        dims = slice(h * d, (h + 1) * d)
        q = attention.query(hidden)[..., dims]
        k, v = attention.key(image)[..., dims], attention.value(image)[..., dims]
        context = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1) @ v
        torch.testing.assert_close(seen["out"][0][..., dims], context, atol=1e-10, rtol=0)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("modality", ["image", "text"])
def test_batched_cells_equal_one_cell_at_a_time(model, image_pair, text_pair, site, modality):
    clean, corrupt, answers = image_pair if modality == "image" else text_pair
    batched = ActivationPatching(model, batch_size=64).run(clean, corrupt, answers=answers, modality=modality, site=site)
    single = ActivationPatching(model, batch_size=1).run(clean, corrupt, answers=answers, modality=modality, site=site)
    tokens = clean["input_ids"].shape[1]
    assert batched.patched_ld.shape == ((3, tokens, 4) if site.endswith("head") else (3, tokens))
    torch.testing.assert_close(batched.patched_ld, single.patched_ld, atol=1e-10, rtol=0)
    torch.testing.assert_close(batched.patched_prob, single.patched_prob, atol=1e-10, rtol=0)


@pytest.mark.parametrize("site", ["resid", "mlp", "self_attn", "self_head"])
def test_vision_tower_sites_for_image_corruption(model, image_pair, site):
    clean, corrupt, answers = image_pair
    batched = ActivationPatching(model).run(clean, corrupt, answers=answers, modality="image", site=site, tower="vision", positions="all")
    single = ActivationPatching(model, batch_size=1).run(clean, corrupt, answers=answers, modality="image", site=site, tower="vision", positions="all")
    torch.testing.assert_close(batched.patched_ld, single.patched_ld, atol=1e-10, rtol=0)
    if site == "resid":  # the last vision layer's output everywhere is all the image the text encoder sees
        torch.testing.assert_close(batched.effect[-1], torch.ones(1, dtype=batched.effect.dtype), atol=1e-9, rtol=0)


def test_hooks_are_removed_also_after_an_error(model, image_pair):
    clean, corrupt, answers = image_pair
    before = _hooks(model)
    probe = ActivationPatching(model)
    probe.run(clean, corrupt, answers=answers, modality="image", site="cross_head", positions="all")
    assert _hooks(model) == before
    probe._scores = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        probe.run(clean, corrupt, answers=answers, modality="image", site="mlp")
    assert _hooks(model) == before


def test_bad_arguments(model, image_pair, text_pair):
    clean, corrupt, answers = image_pair
    probe = ActivationPatching(model)
    with pytest.raises(ValueError, match="site must be one of"):
        probe.run(clean, corrupt, answers=answers, modality="image", site="cross_attn", tower="vision")
    with pytest.raises(ValueError, match="answers=\\(correct_token_id, incorrect_token_id\\)"):
        probe.run(clean, corrupt, modality="image")
    with pytest.raises(ValueError, match="clean and corrupt questions differ"):
        probe.run(clean, text_pair[1], answers=answers, modality="image")


def test_symmetric_token_replacement(tokenizer):
    replaced = symmetric_token_replacement(tokenizer, "is the circle red or blue?", ["red", "blue"], ["green", "red", "purple"])
    assert replaced == "is the circle green or purple?"
    with pytest.raises(ValueError, match="no candidate for 'blue'"):
        symmetric_token_replacement(tokenizer, "is the circle red or blue?", ["red", "blue"], ["green", "light grey"])


def test_pairs_from_a_manifest_skip_and_list_bad_records(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    rows = [
        {"id": "good", "clean_image": "a.png", "corrupt_image": "b.png", "question": "is it red or blue?", "answer": "red", "wrong_answer": "blue"},
        {"id": "gone", "clean_image": "a.png", "corrupt_image": "missing.png", "question": "q?", "answer": "red", "wrong_answer": "blue"},
        {"id": "half", "clean_image": "a.png", "question": "q?", "answer": "red", "wrong_answer": "blue"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs, failures = read_vqa_pairs(tmp_path / "pairs.jsonl")
    assert [p.id for p in pairs] == ["good"] and pairs[0].corrupt_image().getpixel((0, 0)) == (0, 0, 255)
    assert {f.id: f.reason.split(":")[0] for f in failures} == {"gone": "image not found", "half": "missing ['corrupt_image']"}


def test_notice_head_ranking_equals_noticess_get_circuits():
    """NOTICE's circuit_analysis: P(answer) with one head patched at the answer token, |.| averaged over
    samples, heads at or above mean + 2 std (numpy's population std), transcribed here in numpy."""
    import numpy as np

    from m2ib_lightning.probing import answer_position, head_scores, important_heads

    rng = np.random.default_rng(0)
    samples, layers, positions, heads = 6, 4, 7, 12
    probs = rng.random((samples, layers, positions, heads)) * 0.2
    probs[:, 2, :, 5] += 0.7  # one head restores the answer wherever it is patched
    questions = [["[CLS]", "is", "the", "circle", "red", "or", "blue", "?"][:positions]] * samples
    answer = ["red"]
    position = answer_position(questions[0], answer)
    assert position == 4
    ours = important_heads(torch.stack([head_scores({"patched_prob": torch.tensor(p)}, "notice", position) for p in probs]).mean(0))

    scores = probs[:, :, position, :]  # NOTICE: (samples, layers, heads) at the answer token
    avg_by_head = np.mean(abs(np.reshape(scores, (samples, -1))), axis=0)
    threshold = 2 * np.std(avg_by_head) + np.mean(avg_by_head)
    theirs = {(int(i) // heads, int(i) % heads) for i in np.where(abs(avg_by_head) >= threshold)[0]}
    assert set(ours) == theirs == {(2, 5)}
    assert answer_position(["[CLS]", "is", "it", "##s"], ["red"]) is None
    assert head_scores({"patched_prob": torch.ones(2, 3, 4)}, "notice", None) is None
    assert head_scores({"effect": torch.ones(2, 4), "flagged": True}, "effect") is None
