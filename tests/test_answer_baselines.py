"""The baselines and the evaluation on answers: every method that applies explains log p(answer) on every answer
adapter with question preprocessing, rollout and Chefer equal the formulas by hand on all three families (and are
refused by name where an adapter describes no attention graph), and evaluate_vqa writes the table."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from m2ib_lightning.backbones.hf_blip_vqa import HFBlipVQAAnswerer
from m2ib_lightning.backbones.hf_llava import HFLlavaAnswerer
from m2ib_lightning.backbones.hf_qwen2_vl import HFQwen2VLAnswerer
from m2ib_lightning.backbones.capabilities import MissingCapabilityError
from m2ib_lightning.baselines import METHODS, AnswerScorer, make_method
from test_answers import QWEN_IMAGE, blip_inputs, inputs, qwen_inputs, qwen_patches, tiny_blip_vqa, tiny_llava, tiny_qwen2_vl
from test_edges_runs import _main
from test_vqa_runs import SIZE, _save_blip_vqa

ATTENTION_METHODS = {"rollout", "chefer"}
SETTINGS = {"m2ib": {"steps": 2, "num_noise": 2, "vision_layer": 0, "text_layer": 0}, "rise": {"masks": 16, "chunk": 8},
            "integrated_gradients": {"steps": 4}}


def _with_processor(adapter):
    """The tiny model with the processor its family ships (the text methods need its tokenizer)."""
    if isinstance(adapter, HFQwen2VLAnswerer):
        return HFQwen2VLAnswerer(adapter.module, _qwen_processor())
    if isinstance(adapter, HFLlavaAnswerer):
        from m2ib_lightning.shapes.models.shapes_llava import build_llava_processor, build_llava_tokenizer

        return HFLlavaAnswerer(adapter.module, build_llava_processor(build_llava_tokenizer(), 16, 8))
    from transformers import BlipProcessor

    from m2ib_lightning.shapes.models.shapes_blip_vqa import build_vqa_image_processor, build_vqa_tokenizer

    return HFBlipVQAAnswerer(adapter.module, BlipProcessor(image_processor=build_vqa_image_processor(16),
                                                           tokenizer=build_vqa_tokenizer()))


def _qwen_processor():
    """Qwen2-VL's processor over tiny_qwen2_vl's 64 ids: 0-6 its special tokens (as there), then words w7 .. w63."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from m2ib_lightning.backbones.hf_qwen2_vl import image_processor_class

    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    words = ["[PAD]", "<s>", "</s>", *vision, *[f"w{i}" for i in range(7, 64)]]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w7")),
                                        pad_token="[PAD]", bos_token="<s>", eos_token="</s>", additional_special_tokens=vision)
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=4096)
    return image_processor_class()(image_processor=images, tokenizer=tokenizer)


def qwen_pictures():
    """Two 16 x 16 pictures (what the methods perturb; the adapter packs them) under qwen_inputs' first prompt, with
    different answers."""
    example = qwen_inputs()
    prompt = example["input_ids"][0][example["attention_mask"][0].bool()].clone()
    prompt[prompt == QWEN_IMAGE] = 7
    prompt[4:8] = QWEN_IMAGE  # a 16 x 16 picture: 4 language-model tokens
    ids = torch.stack([prompt[:-2], prompt[:-2]])
    pictures = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return pictures, ids, torch.ones_like(ids), example["answer_ids"], example["answer_mask"]


def _hooks(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in module.named_modules()}


FAMILIES = {"hf_llava": (tiny_llava, inputs), "hf_blip_vqa": (tiny_blip_vqa, blip_inputs),
            "hf_qwen2_vl": (tiny_qwen2_vl, qwen_pictures)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_explains_log_p_of_the_answer_and_leaves_the_model_untouched(family):
    build, example = FAMILIES[family]
    model = _with_processor(build())
    px, ids, mask, answers, answer_mask = example()
    special = (mask == 0) | (ids == getattr(model.config, "image_token_id", -1)) | (ids < 7) * (family == "hf_qwen2_vl")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    attention_before = model.module.config._attn_implementation
    with torch.no_grad():  # transformers places its own output-recording hooks at a model's first forward
        model.answer_log_likelihood(model.answer_batch(px, ids, mask, answers, answer_mask))
    hooks_before = _hooks(model.module)
    for name in sorted(set(METHODS) - {"m2ib_amortised"}):
        method = make_method(name, model, **SETTINGS.get(name, {}))
        assert isinstance(method.scorer, AnswerScorer)
        maps = method.attribute(px, ids, mask, torch.tensor([1, 2]), special, answers=(answers, answer_mask))
        assert maps.image.shape == (2, 16, 16) and bool(torch.isfinite(maps.image).all()), name
        assert float(maps.image.amin()) >= 0 and float(maps.image.amax()) <= 1 and float(maps.image.std()) > 0, name
        if maps.text is not None:
            assert maps.text.shape == ids.shape and bool((maps.text[mask == 0] == 0).all()), name
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert all(p.grad is None for p in model.module.parameters())
    assert model.module.config._attn_implementation == attention_before
    assert _hooks(model.module) == hooks_before
    with pytest.raises(ValueError, match="m2ib_amortised on a VLM that answers needs settings.explainer"):
        make_method("m2ib_amortised", model)


def attention_relevance_by_hand(adapter, name: str, pixels, ids, mask, answers, answer_mask, first: int = 0):
    """Rollout / Chefer on each sample alone, by the papers' formulas, through the model's own forward (a trainable
    copy in eager mode, ``output_attentions``): R = I folded over the language model's layers, the rows predicting
    the answer's tokens summed; the image tokens' values upsampled, the prompt's (not its image tokens) min-maxed.
    ``first``: the first layer folded."""
    model = copy.deepcopy(adapter.module).requires_grad_(True)
    model.set_attn_implementation("eager")
    image_id = model.config.image_token_id
    images, texts = [], torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(len(ids)):
        prompt, answer = ids[b][mask[b].bool()], answers[b][answer_mask[b].bool()]
        sequence = torch.cat([prompt, answer])[None]
        if isinstance(adapter, HFQwen2VLAnswerer):
            grid = torch.tensor([[1, pixels.shape[-2] // 4, pixels.shape[-1] // 4]])
            extra = {"pixel_values": qwen_patches(pixels[b]), "image_grid_thw": grid,
                     "mm_token_type_ids": (sequence == image_id).int()}
        else:
            extra = {"pixel_values": pixels[b:b + 1]}
        out = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), output_attentions=True, **extra)
        log_p, start = out.logits[0].log_softmax(-1), len(prompt) - 1
        score = sum(log_p[start + t, token] for t, token in enumerate(answer))
        grads = torch.autograd.grad(score, out.attentions) if name == "chefer" else [None] * len(out.attentions)
        eye = torch.eye(sequence.shape[1], dtype=torch.float64)
        relevance = eye
        for attention, grad in list(zip(out.attentions, grads))[first:]:
            attention = attention[0].detach()
            if name == "chefer":
                relevance = relevance + (grad[0] * attention).clamp(min=0).mean(0) @ relevance
            else:
                mixed = 0.5 * attention.mean(0) + 0.5 * eye
                relevance = (mixed / mixed.sum(-1, keepdim=True)) @ relevance
        row = relevance[start:start + len(answer)].sum(0)[:len(prompt)]
        cells = row[prompt == image_id]
        side = int(len(cells) ** 0.5)
        cells = cells[len(cells) - side * side:]  # LLaVA's "full" strategy: the CLS feature first, no cell
        image = F.interpolate(cells.view(1, 1, side, side), size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        images.append((image - image.min()) / (image.max() - image.min()))
        text = torch.where(prompt == image_id, 0, row)
        texts[b, mask[b].bool()] = (text - text.min()) / (text.max() - text.min())
    return torch.stack(images), texts


@pytest.mark.parametrize("family", ["hf_llava", "hf_qwen2_vl"])
@pytest.mark.parametrize("name", sorted(ATTENTION_METHODS))
def test_rollout_and_chefer_on_answers_equal_the_formulas_by_hand_on_each_sample_alone(family, name):
    """Through the language model, where the image tokens meet the prompt and the answer: batched and padded (left
    padding on LLaVA) as a run gives them, equal to each sample's solo run through the model's own forward."""
    build, example = FAMILIES[family]
    model = _with_processor(build())
    px, ids, mask, answers, answer_mask = example()
    maps = make_method(name, model).attribute(px, ids, mask, torch.tensor([0, 0]), answers=(answers, answer_mask))
    image, text = attention_relevance_by_hand(model, name, px, ids, mask, answers, answer_mask)
    torch.testing.assert_close(maps.image, image, atol=1e-10, rtol=0)
    torch.testing.assert_close(maps.text, text, atol=1e-10, rtol=0)
    assert float(maps.image.std()) > 0.05 and bool((maps.text[ids == model.config.image_token_id] == 0).all())


def blip_relevance_by_hand(adapter, name: str, pixels, ids, mask, answers, answer_mask):
    """Rollout / Chefer on BLIP VQA, each sample alone, written out for its three token groups (image I, question Q,
    answer A) through the model's own vision tower, text encoder and decoder (a trainable copy, output_attentions).
    Chefer: self-attention R_sx += A R_sx; cross-attention s -> q: R_sq += norm(R_ss)^T A norm(R_qq) and, on to the
    image, R_AI += norm(R_AA)^T A R_QI. Rollout: self-attention R_sx = rownorm(A/2 + I/2) R_sx; cross-attention
    R_sx = R_sx / 2 + A R_qx / 2."""
    model = copy.deepcopy(adapter.module).requires_grad_(True)

    def norm(r):
        rest = r - torch.eye(len(r), dtype=r.dtype)
        return rest / rest.sum(-1, keepdim=True) + torch.eye(len(r), dtype=r.dtype)

    images, texts = [], torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(len(ids)):
        question, answer = ids[b][mask[b].bool()][None], answers[b][answer_mask[b].bool()]
        vision = model.vision_model(pixel_values=pixels[b:b + 1], output_attentions=True)
        image = vision.last_hidden_state
        encoded = model.text_encoder(input_ids=question, attention_mask=torch.ones_like(question), encoder_hidden_states=image,
                                     output_attentions=True)
        decoder_ids = torch.cat([answer.new_tensor([model.decoder_start_token_id]), answer[:-1]])[None]
        decoded = model.text_decoder(input_ids=decoder_ids, encoder_hidden_states=encoded.last_hidden_state, output_attentions=True)
        score = decoded.logits[0].log_softmax(-1).gather(1, answer[:, None]).sum()
        attentions = [*vision.attentions, *encoded.attentions, *encoded.cross_attentions, *decoded.attentions, *decoded.cross_attentions]
        grads = torch.autograd.grad(score, attentions) if name == "chefer" else [a * 0 for a in attentions]
        chefer = {id(a): (g[0] * a[0]).clamp(min=0).mean(0).detach() for a, g in zip(attentions, grads)}
        mean = {id(a): a[0].mean(0).detach() for a in attentions}

        def rolled(a):
            mixed = 0.5 * mean[id(a)] + 0.5 * torch.eye(a.shape[-1], dtype=torch.float64)
            return mixed / mixed.sum(-1, keepdim=True)

        n_i, n_q, n_a = image.shape[1], question.shape[1], decoder_ids.shape[1]
        eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
        r_ii, r_qq, r_qi, r_aa, r_aq, r_ai = eye(n_i), eye(n_q), torch.zeros(n_q, n_i, dtype=torch.float64), eye(n_a), \
            torch.zeros(n_a, n_q, dtype=torch.float64), torch.zeros(n_a, n_i, dtype=torch.float64)
        for a in vision.attentions:
            r_ii = r_ii + chefer[id(a)] @ r_ii if name == "chefer" else rolled(a) @ r_ii
        for own, cross in zip(encoded.attentions, encoded.cross_attentions):
            if name == "chefer":
                r_qq, r_qi = r_qq + chefer[id(own)] @ r_qq, r_qi + chefer[id(own)] @ r_qi
                r_qi = r_qi + norm(r_qq).T @ chefer[id(cross)] @ norm(r_ii)
            else:
                r_qq, r_qi = rolled(own) @ r_qq, rolled(own) @ r_qi
                r_qq, r_qi = 0.5 * r_qq, 0.5 * r_qi + 0.5 * mean[id(cross)] @ r_ii
        for own, cross in zip(decoded.attentions, decoded.cross_attentions):
            if name == "chefer":
                r_aa, r_aq, r_ai = (r + chefer[id(own)] @ r for r in (r_aa, r_aq, r_ai))
                r_aq, r_ai = r_aq + norm(r_aa).T @ chefer[id(cross)] @ norm(r_qq), r_ai + norm(r_aa).T @ chefer[id(cross)] @ r_qi
            else:
                r_aa, r_aq, r_ai = (rolled(own) @ r for r in (r_aa, r_aq, r_ai))
                r_aa, r_aq, r_ai = 0.5 * r_aa, 0.5 * r_aq + 0.5 * mean[id(cross)] @ r_qq, 0.5 * r_ai + 0.5 * mean[id(cross)] @ r_qi
        side = int((n_i - 1) ** 0.5)
        cells = r_ai.sum(0)[1:].view(1, 1, side, side)
        up = F.interpolate(cells, size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        images.append((up - up.min()) / (up.max() - up.min()))
        text = r_aq.sum(0)
        texts[b, mask[b].bool()] = (text - text.min()) / (text.max() - text.min())
    return torch.stack(images), texts


@pytest.mark.parametrize("name", sorted(ATTENTION_METHODS))
def test_rollout_and_chefer_on_blip_vqa_follow_the_answer_through_both_cross_attentions(name):
    model = _with_processor(tiny_blip_vqa())
    px, ids, mask, answers, answer_mask = blip_inputs()  # the second question right-padded
    maps = make_method(name, model).attribute(px, ids, mask, torch.tensor([0, 0]), answers=(answers, answer_mask))
    image, text = blip_relevance_by_hand(model, name, px, ids, mask, answers, answer_mask)
    torch.testing.assert_close(maps.image, image, atol=1e-10, rtol=0)
    torch.testing.assert_close(maps.text, text, atol=1e-10, rtol=0)
    assert float(maps.image.std()) > 0.05


def test_attention_methods_on_a_llava_that_reads_the_cls_feature_too_read_the_patch_tokens():
    """vision_feature_select_strategy "full": 1 + 4 image tokens per prompt, the first (CLS) stands for no cell."""
    model = _with_processor(tiny_llava())
    model.module.config.vision_feature_select_strategy = "full"
    px, ids, mask, answers, answer_mask = inputs()
    image = model.config.image_token_id
    ids = torch.stack([torch.cat([row[:row.tolist().index(image)], row.new_tensor([image]), row[row.tolist().index(image):]])
                       for row in ids])
    mask = (ids != 0).long()  # inputs() pads with 0, which no real token is
    maps = make_method("chefer", model).attribute(px, ids, mask, torch.tensor([0, 0]), answers=(answers, answer_mask))
    expected, text = attention_relevance_by_hand(model, "chefer", px, ids, mask, answers, answer_mask)
    torch.testing.assert_close(maps.image, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(maps.text, text, atol=1e-10, rtol=0)
    assert model.image_keys("language", {"input_ids": ids[:1], "pixel_values": px[:1]})[0].tolist() == \
        (ids[0] == image).nonzero()[1:, 0].tolist()


def test_attention_methods_fold_a_half_precision_model_in_float32():
    model = _with_processor(tiny_llava())
    px, ids, mask, answers, answer_mask = inputs()
    exact = make_method("chefer", model).attribute(px, ids, mask, torch.tensor([0, 0]), answers=(answers, answer_mask))
    model.module.to(torch.bfloat16)
    half = make_method("chefer", model).attribute(px.bfloat16(), ids, mask, torch.tensor([0, 0]), answers=(answers, answer_mask))
    assert half.image.dtype == half.text.dtype == torch.float32
    torch.testing.assert_close(half.image, exact.image.float(), atol=0.1, rtol=0)
    torch.testing.assert_close(half.text, exact.text.float(), atol=0.1, rtol=0)


def test_chefer_on_answers_from_the_last_layer_folds_that_layer_alone():
    model = _with_processor(tiny_llava())
    px, ids, mask, answers, answer_mask = inputs()
    maps = make_method("chefer", model, start_layer=-1).attribute(px, ids, mask, torch.tensor([0, 0]), answers=(answers, answer_mask))
    image, text = attention_relevance_by_hand(model, "chefer", px, ids, mask, answers, answer_mask, first=-1)
    every, _ = attention_relevance_by_hand(model, "chefer", px, ids, mask, answers, answer_mask)
    torch.testing.assert_close(maps.image, image, atol=1e-10, rtol=0)
    torch.testing.assert_close(maps.text, text, atol=1e-10, rtol=0)
    assert float((image - every).abs().max()) > 0.05


def test_saliency_on_answers_is_the_gradient_of_log_p_of_the_answer():
    model = _with_processor(tiny_blip_vqa())
    px, ids, mask, answers, answer_mask = blip_inputs()
    maps = make_method("saliency", model).attribute(px, ids, mask, torch.tensor([0, 0]), answers=(answers, answer_mask))
    for b in range(2):  # by hand: |d log p(answer_b) / d pixels_b| summed over channels, min-maxed
        pixels = px[b:b + 1].clone().requires_grad_(True)
        batch = model.answer_batch(pixels, ids[b:b + 1], mask[b:b + 1], answers[b:b + 1], answer_mask[b:b + 1])
        (grad,) = torch.autograd.grad(model.answer_log_likelihood(batch).sum(), [pixels])
        expected = grad.abs().sum(1)[0]
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        torch.testing.assert_close(maps.image[b], expected, atol=1e-10, rtol=0)


def test_an_evaluation_on_answers_writes_the_table_of_every_method(tmp_path, capsys):
    checkpoint = _save_blip_vqa(tmp_path / "blip-vqa")
    out = tmp_path / "evaluation"
    result = _main(capsys, "configs/evaluate_shapes_vqa.yaml", f"output_dir={out}", f"model.name_or_path={checkpoint}",
                   f"world.image_size={SIZE}", "data.num_samples=4", "data.batch_size=2", "m2ib.steps=2", "m2ib.num_noise=2",
                   "baselines.rise.masks=16", "baselines.rise.chunk=8", "baselines.integrated_gradients.steps=4",
                   "metrics.steps=4", "export.grid_samples=2", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert list(methods) == ["m2ib", "saliency", "integrated_gradients", "grad_x_activation", "grad_cam", "rise", "rollout",
                             "chefer", "random"]
    for name, row in methods.items():
        assert row["samples"] == 4
        for column in ("image_deletion_auc", "image_insertion_auc", "pointing_game", "energy"):
            mean = row[column][0]
            assert mean is not None and 0 <= mean <= 1, (name, column)  # the answer's probability, not its log
    assert methods["m2ib"]["text_deletion_auc"] is not None and methods["saliency"]["text_deletion_auc"] is None
    assert methods["chefer"]["text_deletion_auc"] is not None
    assert "4 questions (the shapes world)" in (out / "results.md").read_text()
    assert (out / "figures" / "methods_grid.png").exists()
    import pandas as pd

    from m2ib_lightning.export import to_parquet

    assert to_parquet(out, tmp_path / "table.parquet", maps=True) == 4  # an evaluation's rows: every method's values
    table = pd.read_parquet(tmp_path / "table.parquet")
    assert table["answer_source"].eq("given").all() and table["answer"].notna().all()
    assert table["m2ib/pointing_game"].mean() == pytest.approx(methods["m2ib"]["pointing_game"][0])
    assert len(table["m2ib/image"].iloc[0]) == SIZE * SIZE


def test_an_answer_adapter_without_an_attention_graph_is_refused_by_the_attention_methods_by_name():
    class WithoutGraph(HFLlavaAnswerer):
        capabilities = ("answers",)

    model = WithoutGraph(tiny_llava().module)
    for name in ATTENTION_METHODS:
        with pytest.raises(MissingCapabilityError, match=f"the {name} method needs the adapter's answer_attention capability"):
            make_method(name, model)
