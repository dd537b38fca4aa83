"""VQA attribution runs through train.py (task attribute_vqa) on tiny LLaVA and BLIP VQA checkpoints saved here:
the written maps are the front door's on the same question and seed, a rerun resumes, the model's own answers are
explained when asked, and a manifest's bad records are skipped with their reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from m2ib_lightning import attribute
from m2ib_lightning.backbones import load_backbone
from m2ib_lightning.data.attribution import sample_seed
from m2ib_lightning.results import index_entries, read_attributions
from test_edges_runs import _main

SIZE = 32  # the world's and the tiny models' image size (patch 8: a 4 x 4 grid)


def _save_llava(path: Path) -> Path:
    from m2ib_lightning.shapes.models.shapes_llava import build_llava_processor, build_llava_tokenizer, build_shapes_llava

    tokenizer = build_llava_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                  patch_size=8, hidden_act="quick_gelu")
    build_shapes_llava(tokenizer, vision, width=32, layers=2, heads=2, vision_feature_layer=-1).save_pretrained(path)
    build_llava_processor(tokenizer, SIZE, 8).save_pretrained(path)
    return path


def _save_blip_vqa(path: Path) -> Path:
    from transformers import BlipProcessor

    from m2ib_lightning.shapes.models.shapes_blip_vqa import build_shapes_blip_vqa, build_vqa_image_processor, build_vqa_tokenizer

    tokenizer = build_vqa_tokenizer()
    build_shapes_blip_vqa(tokenizer, image_size=SIZE, patch_size=8, width=32, vision_layers=2, text_layers=2, heads=2).save_pretrained(path)
    BlipProcessor(image_processor=build_vqa_image_processor(SIZE), tokenizer=tokenizer).save_pretrained(path)
    return path


QWEN_CHAT = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
             "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ part['text'] }}"
             "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} assistant:{% endif %}")


def _save_qwen2_vl(path: Path) -> Path:
    """A tiny Qwen2-VL (patch 4, 2x2 merger: 16 language-model tokens for a 32 px picture) with a word-level tokenizer
    of the world's words, Qwen's vision tokens and a chat template, and the image processor resizing as Qwen's does."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from m2ib_lightning.backbones.hf_qwen2_vl import image_processor_class
    from m2ib_lightning.shapes.questions import vqa_vocabulary

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    words = ["[PAD]", "<s>", "</s>", *vision_tokens, "[UNK]", "user", "assistant", ":", *vqa_vocabulary()]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    core.normalizer, core.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=vision_tokens)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in vision_tokens}
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64)
    image_processor_class()(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_CHAT).save_pretrained(path)
    return path


FAMILIES = {"hf_llava": _save_llava, "hf_blip_vqa": _save_blip_vqa, "hf_qwen2_vl": _save_qwen2_vl}


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory) -> Path:
    return FAMILIES[request.param](tmp_path_factory.mktemp(request.param))


def _args(out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["configs/attribute_shapes_vqa.yaml", f"output_dir={out}", f"model.name_or_path={checkpoint}", f"world.image_size={SIZE}",
            "m2ib.vision_layer=0", "m2ib.text_layer=1", "m2ib.steps=2", "m2ib.num_noise=2", "data.batch_size=3",
            "export.overlays=2", "trainer.enable_progress_bar=false", *extra]


def _front_door(model, image: Image.Image, question: str, answer: str | None, seed: int, **settings):
    """The maps of one question by ``m2ib_lightning.attribute``, its inputs made by the adapter."""
    inputs = model.question_inputs(image, question)
    ids = torch.tensor([inputs.ids])
    given = {} if answer is None else {"answer_ids": torch.tensor([model.answer_inputs(answer)])}
    images = model.join_inputs([inputs.image])  # pixel values, and what else the family takes (Qwen2-VL's grid)
    return attribute(model, images.pop("pixel_values"), ids, torch.ones_like(ids), seed=seed, **given, **images, **settings)


def test_a_world_vqa_run_writes_the_front_doors_maps_and_resumes(tmp_path, capsys, checkpoint):
    from m2ib_lightning.shapes.questions import ShapesVQA
    from m2ib_lightning.shapes.world import ShapesWorld

    out = tmp_path / "run"
    assert _main(capsys, *_args(out, checkpoint, "data.num_samples=4")).returncode == 0
    first = {r.id: r for r in read_attributions(out)}
    assert len(first) == 4 and {r.answer_source for r in first.values()} == {"given"}
    assert len(list((out / "overlays" / "rank0").glob("*.png"))) == 2

    entries = {e["id"]: e for e in index_entries(out)}
    model = load_backbone(str(checkpoint))
    vqa = ShapesVQA(ShapesWorld(seed=2, image_size=SIZE, max_objects=3, noise=0.03),
                    ("colour", "shape", "size", "what_colour", "what_shape", "what_size"))
    for index in (0, 3):
        sample = vqa.sample(index)
        record = first[sample.id]
        assert record.text == sample.question.text and record.answer == sample.question.answer
        expected = _front_door(model, sample.sample.image, sample.question.text, sample.question.answer,
                               sample_seed(0, sample.id), vision_layer=0, text_layer=1, steps=2, num_noise=2)
        torch.testing.assert_close(record.image_capacity, expected.image_patch_capacity[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(record.text_capacity, expected.text_capacity[0], atol=1e-5, rtol=1e-5)
        shown = [t for t, hidden in zip(record.tokens, entries[sample.id]["special"]) if not hidden]
        assert " ".join(shown).replace(" ?", "?") == sample.question.text  # chat template and special tokens hidden

    assert _main(capsys, *_args(out, checkpoint, "data.num_samples=6")).returncode == 0  # resumes: 2 more
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 2 and summary["skipped"] == 4 and summary["localisation_pairs"] == 2
    again = {r.id: r for r in read_attributions(out)}
    assert len(again) == 6 and len(list(index_entries(out))) == 6
    for key, record in first.items():  # what was written is kept as it was
        assert torch.equal(again[key].image_capacity, record.image_capacity)


def test_the_models_own_answers_are_explained_when_asked(tmp_path, capsys, checkpoint):
    out = tmp_path / "own"
    assert _main(capsys, *_args(out, checkpoint, "data.num_samples=3", "answers.source=generate",
                                "answers.max_new_tokens=2")).returncode == 0
    model = load_backbone(str(checkpoint))
    records = list(read_attributions(out))
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(records) + len(failures) == 3
    assert all("own answer is empty" in f["reason"] for f in failures)
    for record in records:
        assert record.answer_source == "generate"
        entry = next(e for e in index_entries(out) if e["id"] == record.id)
        ids = torch.tensor([model.question_inputs(Image.new("RGB", (SIZE, SIZE)), record.text).ids])
        assert entry["answer"] == record.answer and isinstance(record.answer, str) and len(ids[0]) == len(record.tokens)


def test_a_question_manifest_skips_bad_records_with_their_reasons(tmp_path, capsys, checkpoint):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (SIZE, SIZE), "red").save(folder / "red.png")
    (folder / "broken.png").write_bytes(b"not a png")
    lines = [
        {"id": "a", "image": "red.png", "question": "what colour is the circle?", "answer": "red", "boxes": [[0, 0, 16, 16]]},
        {"id": "b", "image": "red.png", "question": "what shape is the red object?"},  # no answer: the model's own
        {"id": "c", "image": "red.png", "question": ""},
        {"id": "d", "image": "red.png", "question": "what colour?", "answer": 3},
        {"id": "e", "image": "broken.png", "question": "what colour is the circle?", "answer": "red"},
        {"id": "f", "image": "../outside.png", "question": "what colour is the circle?", "answer": "red"},
    ]
    (folder / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "manifest"
    result = _main(capsys, *_args(out, checkpoint, f"data.manifest={folder / 'questions.jsonl'}", "answers.max_new_tokens=2"))
    assert result.returncode == 0
    reasons = {f["id"]: f["reason"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert "empty question" in reasons["c"] and "answer must be a non-empty string" in reasons["d"]
    assert "e" in reasons and "outside data.root" in reasons["f"]
    records = {r.id: r for r in read_attributions(out)}
    assert records["a"].answer == "red" and records["a"].answer_source == "given"
    assert "b" in records or "own answer is empty" in reasons["b"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["localisation_pairs"] == 1  # a's boxes


def test_a_vqa_run_refuses_a_dual_encoder(tmp_path, capsys):
    result = _main(capsys, *_args(tmp_path / "clip", Path("builtin:shapes-clip"), "world.image_size=64"))
    assert result.returncode == 2 and "questions capability" in result.stderr


def test_questions_from_webdataset_shards_with_their_answers_and_bad_samples_reported(tmp_path, capsys):
    import io

    from conftest import write_tar

    checkpoint = _save_llava(tmp_path / "llava")
    png = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), "red").save(png, format="PNG")
    members = {"k0.png": png.getvalue(), "k0.json": json.dumps({"question": "what colour is the circle?", "answer": "red"}).encode(),
               "k1.png": png.getvalue(), "k1.json": json.dumps({"question": "what shape is the red object?"}).encode(),
               "k2.png": png.getvalue(), "k2.json": json.dumps({"caption": "a red circle"}).encode()}
    write_tar(tmp_path / "00000.tar", members)
    out = tmp_path / "wds"
    result = _main(capsys, *_args(out, checkpoint, f"data.webdataset={tmp_path / '00000.tar'}", "answers.max_new_tokens=2"))
    assert result.returncode == 0
    reasons = {f["id"]: f["reason"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert "no question" in reasons["00000/k2"]
    records = {r.id: r for r in read_attributions(out)}
    assert records["00000/k0"].answer == "red" and records["00000/k0"].answer_source == "given"
    assert records["00000/k0"].text == "what colour is the circle?"
    assert "00000/k1" in records or "own answer is empty" in reasons["00000/k1"]
    if "00000/k1" in records:
        assert records["00000/k1"].answer_source == "generate"

def test_an_evaluation_of_qwen2_vl_scores_every_method_on_its_pictures(tmp_path, capsys):
    """The metrics perturb (B, 3, H, W) pictures; the adapter packs them as Qwen2-VL's processor does."""
    checkpoint = _save_qwen2_vl(tmp_path / "qwen")
    out = tmp_path / "eval"
    result = _main(capsys, "configs/evaluate_shapes_vqa.yaml", f"model.name_or_path={checkpoint}", f"world.image_size={SIZE}",
                   f"output_dir={out}", "data.num_samples=2", "data.batch_size=2", "m2ib.steps=1", "m2ib.num_noise=1",
                   "methods=[m2ib,saliency,grad_cam,rise,rollout,chefer,random]", "baselines.rise.masks=8", "baselines.rise.chunk=8",
                   "metrics.steps=2", "export.grid_samples=0", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr
    methods = json.loads((out / "summary.json").read_text())["methods"]
    for name, row in methods.items():
        assert row["samples"] == 2, name
        for column in ("image_deletion_auc", "image_insertion_auc", "pointing_game"):
            assert row[column][0] is not None and 0 <= row[column][0] <= 1, (name, column)
    assert methods["m2ib"]["text_deletion_auc"][0] is not None and methods["chefer"]["text_deletion_auc"][0] is not None


def test_qwen2_vl_runs_keep_each_pictures_aspect_ratio_and_maps_go_back_to_the_original(tmp_path, capsys):
    """Pictures of three sizes interleaved in one manifest: batched by size (2 per batch), every one explained, each
    map on its own picture's grid and the same as when each question is its own batch."""
    checkpoint = _save_qwen2_vl(tmp_path / "qwen")
    g = torch.Generator().manual_seed(0)
    sizes = {"w": (30, 20), "t": (20, 30), "s": (24, 24)}  # resized as Qwen2-VL does: 32x16, 16x32, 24x24 px
    lines = []
    for i, kind in enumerate("wtswt"):
        pixels = (torch.rand(*sizes[kind][::-1], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{kind}{i}.png")
        lines.append({"id": f"{kind}{i}", "image": f"{kind}{i}.png", "question": "what colour is the circle?", "answer": "red"})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    runs = {}
    for batch in (2, 1):
        out = tmp_path / f"batch{batch}"
        assert _main(capsys, *_args(out, checkpoint, f"data.manifest={tmp_path / 'q.jsonl'}", f"data.batch_size={batch}")).returncode == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["done"] == 5 and summary["failed"] == 0
        runs[batch] = {r.id: r for r in read_attributions(out)}
    grids = {"w": (4, 8), "t": (8, 4), "s": (6, 6)}
    for sample_id, record in runs[2].items():
        assert tuple(record.image_capacity.shape) == grids[sample_id[0]], sample_id
        assert tuple(record.image_map.shape) == tuple(4 * v for v in grids[sample_id[0]])
        torch.testing.assert_close(record.image_capacity, runs[1][sample_id].image_capacity, atol=1e-4, rtol=0)
        torch.testing.assert_close(record.text_capacity, runs[1][sample_id].text_capacity, atol=1e-4, rtol=0)
    original = {r.id: r for r in read_attributions(tmp_path / "batch2", original_size=True)}
    assert tuple(original["w0"].image_map.shape) == (20, 30) and tuple(original["t1"].image_map.shape) == (30, 20)


@pytest.mark.parametrize("family", ["hf_llava", "hf_qwen2_vl"])
def test_a_probe_run_on_a_decoder_vlm_writes_role_maps_image_token_maps_and_head_overlays(tmp_path, capsys, family):
    """NOTICE through train.py on a decoder VLM: every language-model and vision-tower site, effects by
    prompt role (the image tokens one role), each image token's effect on the image's token grid, heads ranked."""
    from safetensors.torch import load_file

    checkpoint = FAMILIES[family](tmp_path / family)
    out = tmp_path / "probe"
    result = _main(capsys, "configs/probe_shapes_llava.yaml", f"model.name_or_path={checkpoint}", f"world.image_size={SIZE}",
                   f"output_dir={out}", "data.num_pairs=2", "data.kinds=[colour,shape]", "probe.top_heads=1",
                   "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 2 and summary["config"]["probe"]["sites"] == ["resid", "attn", "head", "mlp", "self_attn", "self_head"]
    effects = load_file(out / "effects.safetensors")
    layers = 2
    grid = (4, 4)  # 32 px: LLaVA's patch 8, or Qwen2-VL's patch 4 merged 2x2
    maps = effects["image/language/resid/image_token_effect"]
    assert maps.shape == (2, layers, *grid) and float(maps.abs().sum()) > 0
    raw = effects["image/language/resid/raw"]
    model = load_backbone(str(checkpoint))
    ids = model.question_inputs(Image.new("RGB", (SIZE, SIZE)), "is the circle red or blue?").ids
    first_image = ids.index(model.image_token_id)  # after the chat template's first tokens
    assert first_image >= 3
    assert bool((raw[:, :, :first_image] == 0).all())  # before the image: the same tokens, exactly no effect
    assert "image/language/resid/colour/mean_by_role" in effects and effects["image/language/head/mean"].shape == (layers, 2)
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"image_language_resid_image_tokens.png", "image_language_resid_colour.png", "image_language_head.png"} <= figures
    import csv

    rows = list(csv.DictReader((out / "heads.csv").open()))
    assert {(r["tower"], r["site"]) for r in rows} >= {("language", "head")} and len([r for r in rows if r["site"] == "head"]) == 2 * 4
    # the vision tower (Qwen2-VL's packed patches too), all its tokens at once, for image corruption only
    assert effects["image/vision/resid/mean"].shape == (2, 1) and "text/vision/resid/raw" not in effects
    assert effects["image/vision/self_head/mean"].shape == (2, 2) and float(effects["image/vision/self_head/mean"].abs().sum()) > 0
