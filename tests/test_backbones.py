"""Every registered adapter (and the plain-torch example) against the conformance suite, the naive
reference, and the ways a config names an adapter."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import ROOT, make_images, make_texts, tiny_blip_itc, tiny_clip, tiny_plain, tiny_siglip
from m2ib_lightning import attribute
from m2ib_lightning.backbones import (
    BACKBONES,
    HFBlipITCBackbone,
    HFCLIPBackbone,
    HFSiglipBackbone,
    UnknownAdapterError,
    adapter_for_config,
    as_backbone,
    load_backbone,
)
from m2ib_lightning.backbones.base import clean_token
from m2ib_lightning.testing import BackboneCheckError, check_backbone, naive_m2ib
from m2ib_lightning.viz.figures import display_text
from plain_dual_encoder import PlainAdapter

#: name -> (model builder, image size, text lengths); one entry per registered adapter, plus the plain example
FAMILIES = {
    "hf_clip": (tiny_clip, 32, [7, 4, 9]),
    "hf_siglip": (tiny_siglip, 32, [12, 12]),  # fixed length, no attention mask
    "hf_blip_itc": (tiny_blip_itc, 32, [7, 4, 9]),
    "plain": (lambda seed=0, **_: PlainAdapter(tiny_plain(seed)), 16, [7, 4, 9]),
}


def test_every_registered_adapter_is_covered():  # adapters of VLMs that answer: tests/test_answers.py
    from m2ib_lightning.backbones.base import HFAnswerLayout

    answering = {n for n, f in BACKBONES.items() if isinstance(f, type) and issubclass(f, HFAnswerLayout)}
    assert set(BACKBONES) - answering <= set(FAMILIES)


# transformers 4.4x's own CLIP text tower cannot run in float64 (it fills a float32 mask with float64's min).
OLD_TRANSFORMERS = int(transformers.__version__.split(".")[0]) < 5


def example(name: str, dtype=torch.float64, seed: int = 0):
    if OLD_TRANSFORMERS and name == "hf_clip" and dtype == torch.float64:
        pytest.skip("transformers 4.x CLIP fails in float64")
    build, size, lengths = FAMILIES[name]
    model = build(seed=seed)
    module = model.module if isinstance(model, PlainAdapter) else model
    module.to(dtype)
    ids, mask = make_texts(lengths, seed=seed + 1)
    if name == "plain":
        ids = ids % 50
    inputs = {"pixel_values": make_images(len(lengths), size=size, seed=seed).to(dtype), "input_ids": ids,
              "attention_mask": None if name == "hf_siglip" else mask}
    return model, inputs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_passes_the_conformance_suite(name):
    model, inputs = example(name)
    passed = check_backbone(model, inputs)
    expected = {"prefix/tail", "batch invariance", "no cross-talk", "model untouched", "naive reference"}
    assert expected <= set(passed)
    assert ("padding" in passed) == (name != "hf_siglip")  # SigLIP has no padding: every position is real
    # every capability claimed is checked: HF adapters built without a processor offer attention, the plain one
    # preprocessing (inferred from its members)
    assert ("attention" in passed) == (name != "plain") and ("preprocessing" in passed) == (name == "plain")
    assert ("probing" in passed) == (name == "hf_clip")  # the dual encoders that declare probe sites


@pytest.mark.parametrize("name", ["hf_clip", "hf_siglip", "hf_blip_itc", "plain"])
@pytest.mark.parametrize("layer", [0, 1])
def test_engine_equals_the_naive_reference_float64(name, layer):
    model, inputs = example(name, seed=4)
    pixels, ids = inputs["pixel_values"][:1], inputs["input_ids"][:1]
    mask = None if inputs["attention_mask"] is None else inputs["attention_mask"][:1]
    kwargs = dict(vision_layer=layer, text_layer=layer, seed=5)
    result = attribute(model, pixels, ids, mask, **kwargs)
    image_map, text_map, image_capacity, text_capacity = naive_m2ib(model, pixels, ids, mask, **kwargs)
    length = text_map.shape[0]
    torch.testing.assert_close(result.image_maps[0], image_map, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.text_maps[0, :length], text_map, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.image_capacity[0], image_capacity, atol=1e-9, rtol=0)
    torch.testing.assert_close(result.text_capacity[0, :length], text_capacity, atol=1e-9, rtol=0)


@pytest.mark.parametrize("adapter_class,build", [(HFCLIPBackbone, tiny_clip), (HFSiglipBackbone, tiny_siglip), (HFBlipITCBackbone, tiny_blip_itc)])
def test_pooled_row_shortcut_is_exact(adapter_class, build):
    model = build(seed=6).double()
    ids, mask = make_texts([12, 6], seed=6)
    inputs = {"image": {"pixel_values": make_images(2, seed=6).double()}, "text": {"input_ids": ids, "attention_mask": torch.ones_like(mask) if adapter_class is HFSiglipBackbone else mask}}
    fast, full = adapter_class(model), adapter_class(model, pooled_row_only=False)
    for modality in ("image", "text"):
        state = fast.prefix(modality, inputs[modality], 0)
        torch.testing.assert_close(fast.tail(modality, state.hidden, state), full.tail(modality, state.hidden, state), atol=1e-12, rtol=0)


@pytest.mark.parametrize("build,capacity_tokens", [(tiny_clip, 17), (tiny_siglip, 16), (tiny_blip_itc, 17)])
def test_attribute_takes_each_hf_family_as_it_is(build, capacity_tokens):
    model = build(seed=7)
    ids, mask = make_texts([12, 12], seed=7)
    result = attribute(model, make_images(2, seed=7), ids, None if build is tiny_siglip else mask, vision_layer=-2, text_layer=-1, steps=2, num_noise=2)
    assert result.image_maps.shape == (2, 32, 32) and result.text_maps.shape == (2, 12)
    assert result.image_capacity.shape == (2, capacity_tokens)  # CLS first, none for SigLIP
    assert torch.isfinite(result.image_capacity).all() and (result.image_capacity > 0).all()
    assert result.image_maps.amax((1, 2)).eq(1).all() and result.image_maps.amin((1, 2)).eq(0).all()


def test_siglip_refuses_an_attention_mask_with_padding():
    ids, mask = make_texts([12, 6], seed=8)
    with pytest.raises(ValueError, match="SigLIP is used without an attention mask"):
        attribute(tiny_siglip(), make_images(2), ids, mask, vision_layer=0, text_layer=0, steps=1)


# ------------------------------------------------------------------ naming an adapter
@pytest.mark.parametrize("build,expected", [(tiny_clip, HFCLIPBackbone), (tiny_siglip, HFSiglipBackbone), (tiny_blip_itc, HFBlipITCBackbone)])
def test_auto_picks_the_adapter_from_the_model_class(build, expected):
    assert type(as_backbone(build())) is expected


def test_a_registered_name_and_a_dotted_path_name_adapters():
    assert type(as_backbone(tiny_clip(), "hf_clip")) is HFCLIPBackbone
    adapter = as_backbone(tiny_plain(), "plain_dual_encoder:PlainAdapter")
    assert type(adapter).__name__ == "PlainAdapter"


def test_unknown_adapters_and_models_list_the_registered_ones():
    with pytest.raises(UnknownAdapterError, match="registered adapters: hf_blip_itc, hf_blip_vqa, hf_clip, hf_llava, hf_qwen2_vl, hf_siglip"):
        as_backbone(tiny_clip(), "nope")
    with pytest.raises(UnknownAdapterError, match="no registered backbone adapter accepts a PlainDualEncoder; registered adapters"):
        as_backbone(tiny_plain())
    with pytest.raises(UnknownAdapterError, match="cannot import 'no_such_module'"):
        as_backbone(tiny_clip(), "no_such_module:Factory")


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"model_type": "clip"}, "hf_clip"),
        ({"model_type": "siglip", "architectures": ["SiglipModel"]}, "hf_siglip"),
        ({"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"]}, "hf_blip_itc"),
        ({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}, "hf_qwen2_vl"),
        ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, "hf_llava"),
    ],
)
def test_auto_picks_the_adapter_from_config_json(config, expected):
    assert adapter_for_config(config) == expected


def test_auto_refuses_a_checkpoint_no_adapter_serves():
    assert adapter_for_config({"model_type": "blip", "architectures": ["BlipForQuestionAnswering"]}) == "hf_blip_vqa"
    with pytest.raises(UnknownAdapterError, match="no registered backbone adapter for model_type='qwen2_5_vl'"):
        adapter_for_config({"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]})


@pytest.mark.parametrize("bundle,expected", [("tiny_bundle", HFCLIPBackbone), ("siglip_bundle", HFSiglipBackbone), ("blip_itc_bundle", HFBlipITCBackbone)])
def test_load_backbone_auto_from_a_saved_checkpoint(request, bundle, expected):
    backbone = load_backbone(str(request.getfixturevalue(bundle)))
    assert type(backbone) is expected and not backbone.module.training
    item = backbone.text_inputs("a red circle")
    assert len(item.ids) >= 4 and not item.truncated


def test_a_tokenizer_without_length_limit_uses_the_models_positions(siglip_bundle):
    backbone = load_backbone(str(siglip_bundle))
    assert backbone.tokenizer.model_max_length > 1e20
    assert backbone.text_limit == 12
    long = backbone.text_inputs(" ".join(["red"] * 30))
    assert len(long.ids) == 12 and long.truncated and long.full_length == 31


# ------------------------------------------------------------------ display of text maps
def test_display_text_drops_special_tokens_strips_markers_and_renormalises():
    tokens = ["<|startoftext|>", "a</w>", "red</w>", "cir", "##cle", "<|endoftext|>"]
    special = [True, False, False, False, False, True]
    words, weights = display_text(tokens, special, torch.tensor([1.0, 0.2, 0.6, 0.4, 0.3, 0.9]))
    assert words == ["a", "red", "cir", "cle"]
    torch.testing.assert_close(torch.tensor(weights), torch.tensor([0.0, 1.0, 0.5, 0.25]))
    assert clean_token("▁cat") == "cat" and clean_token("Ġdog") == "dog"


def test_docs_show_the_plain_adapter_as_tested():
    source = (ROOT / "tests" / "plain_dual_encoder.py").read_text()
    adapter = source.split("# --8<-- [start:adapter]\n")[1].split("# --8<-- [end:adapter]")[0]
    assert adapter.strip() in (ROOT / "docs" / "backbones.md").read_text()


def test_a_broken_adapter_fails_naming_the_property():
    model, inputs = example("plain")

    class LeakyTail(PlainAdapter):
        def tail(self, modality, hidden, state):  # pools over padding too: padding reaches the embedding
            if modality == "text":
                for block in self.blocks(modality)[state.layer + 1 :]:
                    hidden = block(hidden, None)
                return self.module.text_head(hidden.mean(1))
            return super().tail(modality, hidden, state)

    with pytest.raises(BackboneCheckError, match="^prefix/tail: text tower"):
        check_backbone(LeakyTail(model.module), inputs)


def test_the_docs_worked_example_runs_as_written(capsys):
    blocks = (ROOT / "docs" / "backbones.md").read_text().split("```python\n")[1:]
    namespace: dict = {}
    for block in blocks[:3]:  # the model, its adapter, the conformance check
        exec(block.split("```")[0], namespace)
    printed = capsys.readouterr().out
    assert "'prefix/tail', 'batch invariance', 'padding', 'no cross-talk', 'model untouched', 'naive reference', 'preprocessing'" in printed


def test_an_adapter_lacking_a_member_of_a_claimed_capability_is_refused_at_load_naming_it():
    from m2ib_lightning.backbones.capabilities import MissingCapabilityError

    model, _ = example("plain")

    class ClaimsAttention(PlainAdapter):
        capabilities = ("towers", "preprocessing", "attention")

        def attention_modules(self, modality):
            return []

    with pytest.raises(MissingCapabilityError, match=r"missing attention: eager_attention"):
        as_backbone(ClaimsAttention(model.module))

    class NoTail:  # the towers of PlainAdapter but its tail
        num_prefix_tokens = 1
        blocks, num_layers, patch_grid = PlainAdapter.blocks, PlainAdapter.num_layers, PlainAdapter.patch_grid
        validate_inputs, embed, prefix = PlainAdapter.validate_inputs, PlainAdapter.embed, PlainAdapter.prefix

        def __init__(self, module):
            self.module = module

    with pytest.raises(MissingCapabilityError, match=r"missing towers: tail\)"):
        as_backbone(NoTail(model.module))


def test_attention_methods_refuse_an_adapter_without_attention_with_a_clear_error():
    from m2ib_lightning.backbones.capabilities import MissingCapabilityError
    from m2ib_lightning.baselines import make_method

    model, _ = example("plain")
    for name in ("rollout", "chefer"):
        with pytest.raises(MissingCapabilityError, match=f"the {name} method needs the adapter's attention capability: "
                                                          "PlainAdapter has no attention_modules, eager_attention"):
            make_method(name, model)


def test_a_run_refuses_an_adapter_without_preprocessing_before_any_work():
    from m2ib_lightning.backbones.capabilities import MissingCapabilityError
    from m2ib_lightning.data.attribution import PairDataModule, WorldSource
    from m2ib_lightning.shapes.world import ShapesWorld

    clip = as_backbone(FAMILIES["hf_clip"][0](seed=0))  # built from a config: no processor
    with pytest.raises(MissingCapabilityError, match="built without a processor"):
        PairDataModule(WorldSource(ShapesWorld(seed=1), 4), clip, run_seed=0)
