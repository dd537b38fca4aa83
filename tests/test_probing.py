"""Activation patching: the sanity properties of PROBING.md, batched equals one cell at a time, hooks undone."""

from __future__ import annotations

import pytest
import torch

from conftest import make_images, make_texts, tiny_clip
from m2ib_lightning.shapes.models.shapes_clip import build_tokenizer
from m2ib_lightning.probing import ActivationPatching, important_heads, mean_effect, same_length_replacement

SITES = ("resid", "mlp", "head")


@pytest.fixture(scope="module")
def model():
    return tiny_clip(seed=4)


@pytest.fixture(scope="module")
def image_pair():
    pixels = make_images(2, seed=3)
    ids, mask = make_texts([6, 9], seed=3)
    return pixels[:1], pixels[1:], {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def text_pair():
    """Two captions differing in one token, padded after EOS; two candidate images."""
    ids, mask = make_texts([7], width=10, seed=8)
    corrupt = ids.clone()
    corrupt[0, 3] = (ids[0, 3] + 5) % 80 + 3
    return {"input_ids": ids, "attention_mask": mask}, {"input_ids": corrupt, "attention_mask": mask}, make_images(2, seed=9)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("modality", ["image", "text"])
def test_patching_the_clean_run_into_itself_changes_nothing(model, image_pair, text_pair, site, modality):
    clean, _, choices = image_pair if modality == "image" else text_pair
    result = ActivationPatching(model).run(clean, clean, choices, modality=modality, site=site)
    torch.testing.assert_close(result.patched_ld, torch.full_like(result.patched_ld, result.clean_ld), atol=1e-5, rtol=0)
    assert result.flagged and torch.isnan(result.effect).all()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_last_layer_residual_everywhere_restores_the_clean_score(model, image_pair, text_pair, modality):
    clean, corrupt, choices = image_pair if modality == "image" else text_pair
    probe = ActivationPatching(model)
    denoised = probe.run(clean, corrupt, choices, modality=modality, site="resid", positions="all")
    assert not denoised.flagged
    torch.testing.assert_close(denoised.effect[-1], torch.ones(1), atol=1e-4, rtol=0)
    noised = probe.run(clean, corrupt, choices, modality=modality, site="resid", positions="all", direction="noise")
    torch.testing.assert_close(noised.effect[-1], torch.ones(1), atol=1e-4, rtol=0)  # the corrupted score is reached


def test_positions_the_corruption_cannot_reach_have_no_effect(model, text_pair):
    """Causal text tower: positions before the changed token and padding after EOS cannot move the score."""
    clean, corrupt, images = text_pair
    for site in SITES:
        result = ActivationPatching(model).run(clean, corrupt, images, modality="text", site=site)
        effect = result.effect if site != "head" else result.effect.abs().amax(-1)
        assert torch.all(effect[:, :3] == 0), site  # before the changed token: identical activations
        assert torch.all(effect[:, 7:] == 0), site  # padding after EOS (position 6)
        assert effect[:, 3:7].abs().sum() > 0, site


@pytest.mark.parametrize(
    "site,positions", [("resid", "each"), ("mlp", "all"), ("head", "each"), ("head", "all"), ("head", "pooled")]
)
def test_batched_cells_equal_one_cell_at_a_time(model, image_pair, site, positions):
    clean, corrupt, choices = image_pair
    batched = ActivationPatching(model, batch_size=64).run(clean, corrupt, choices, modality="image", site=site, positions=positions)
    single = ActivationPatching(model, batch_size=1).run(clean, corrupt, choices, modality="image", site=site, positions=positions)
    layers, tokens, heads = 4, 17, 4
    expected = {"each": (layers, tokens), "all": (layers, 1), "pooled": (layers, 1)}[positions]
    if site == "head":
        expected = (layers, tokens, heads) if positions == "each" else (layers, heads)
    assert batched.effect.shape == expected
    torch.testing.assert_close(batched.patched_ld, single.patched_ld, atol=1e-5, rtol=1e-5)
    if positions == "pooled":  # the CLS column of patching each position
        each = ActivationPatching(model).run(clean, corrupt, choices, modality="image", site=site, positions="each")
        torch.testing.assert_close(batched.patched_ld, each.patched_ld[:, 0], atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_also_after_an_error(model, image_pair):
    clean, corrupt, choices = image_pair
    before = _hook_count(model)
    ActivationPatching(model).run(clean, corrupt, choices, modality="image", site="head", positions="all")
    assert _hook_count(model) == before
    probe = ActivationPatching(model)
    probe._scores = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        probe.run(clean, corrupt, choices, modality="image", site="mlp")
    assert _hook_count(model) == before


def test_bad_arguments(model, image_pair):
    clean, corrupt, choices = image_pair
    probe = ActivationPatching(model)
    with pytest.raises(ValueError, match="site must be one of"):
        probe.run(clean, corrupt, choices, modality="image", site="attention")
    with pytest.raises(ValueError, match="must keep the token count"):
        probe.run({"input_ids": torch.ones(1, 5, dtype=torch.long)}, {"input_ids": torch.ones(1, 6, dtype=torch.long)},
                  clean.expand(2, -1, -1, -1), modality="text")
    with pytest.raises(ValueError, match="exactly two candidates"):
        probe.run(clean, corrupt, {k: v[:1] for k, v in choices.items()}, modality="image")


def test_probe_sites_are_resolved_once_and_an_unknown_one_is_refused(tmp_path):
    from m2ib_lightning.config import CONFIG_DIR, ConfigError, load_config

    cfg = load_config(CONFIG_DIR / "probe_shapes.yaml", ["probe.sites=[self_head,head,self_attn]"])
    assert list(cfg.probe.sites) == ["self_head", "self_head", "self_attn"]
    with pytest.raises(ConfigError, match=r"probe.sites=\['cross_head'\]"):
        load_config(CONFIG_DIR / "probe_shapes.yaml", ["probe.sites=[cross_head]"])
    with pytest.raises(ConfigError, match="probe.sites"):
        load_config(CONFIG_DIR / "probe_shapes_vqa.yaml", ["probe.sites=[heads]"])
    from m2ib_lightning.tasks.probe_vqa import probed_towers_and_sites
    from test_answers import tiny_blip_vqa, tiny_llava

    blip, llava = tiny_blip_vqa(), tiny_llava()
    cfg = load_config(CONFIG_DIR / "probe_shapes_vqa.yaml", ["probe.sites=[head]"])  # a decoder's site: BLIP has none
    with pytest.raises(ConfigError, match=r"probe.sites: \['head'\] are sites of none of the towers \['text', 'vision'\]"):
        probed_towers_and_sites(cfg, blip)
    cfg = load_config(CONFIG_DIR / "probe_shapes_llava.yaml", ["model.name_or_path=x", "probe.towers=[text]"])
    with pytest.raises(ConfigError, match=r"\['text'\] are not probe towers of HFLlavaAnswerer; it has \['language', 'vision'\]"):
        probed_towers_and_sites(cfg, llava)
    cfg = load_config(CONFIG_DIR / "probe_shapes_llava.yaml", ["model.name_or_path=x"])
    assert probed_towers_and_sites(cfg, llava) == (["language", "vision"],
                                                   ["resid", "attn", "head", "mlp", "self_attn", "self_head"])


def test_heads_of_equal_effect_are_none_important():
    assert important_heads(torch.full((3, 4), 0.25)) == [] and important_heads(torch.zeros(2, 2)) == []


def test_aggregation_and_important_heads():
    effects = torch.zeros(3, 4)
    effects[1, 2] = 5.0
    assert important_heads(effects) == [(1, 2)]
    # population std (numpy's, as NOTICE): values 0, 0, 0, 3 -> mean 0.75, std 1.299; 0.75 + 2 * 1.299 = 3.35 > 3
    assert important_heads(torch.tensor([[0.0, 0.0, 0.0, 3.0]])) == []
    assert important_heads(torch.tensor([[0.0, 0.0, 0.0, 3.0]]), num_std=1.5) == [(0, 3)]
    from m2ib_lightning.probing.patching import PatchingResult

    def result(effect, flagged):
        return PatchingResult(effect, torch.ones(2, 2), torch.ones(2, 2), 1.0, 0.0, 0.5, 0.1, flagged, "self_head", "denoise")

    ok, flagged = result(torch.ones(2, 2), False), result(torch.full((2, 2), float("nan")), True)
    mean, raw, count = mean_effect([ok, flagged, ok])
    assert torch.equal(mean, torch.ones(2, 2)) and raw.shape == (3, 2, 2) and torch.isnan(raw[1]).all() and count == 1
    mean, _, count = mean_effect([flagged])  # a group of flagged pairs only is reported, not fatal
    assert torch.isnan(mean).all() and count == 1


def test_universal_heads_never_mix_towers_or_sites():
    from m2ib_lightning.probing import universal_heads

    important = {
        ("colour", "image", "text", "cross_head"): [(1, 2), (0, 0)],
        ("shape", "text", "text", "cross_head"): [(1, 2)],
        ("colour", "image", "vision", "self_head"): [(1, 2)],
        ("colour", "image", "text", "self_head"): [(0, 0)],
    }
    assert universal_heads(important) == {"text/cross_head": [(1, 2)], "vision/self_head": [(1, 2)], "text/self_head": [(0, 0)]}


def test_effects_are_averaged_by_template_role():
    from m2ib_lightning.probing import effect_by_role

    a = torch.tensor([[1.0, 2.0, 3.0]])  # [CLS] NOUN ?
    b = torch.tensor([[5.0, 7.0, 9.0, 11.0]])  # [CLS] NOUN_COLOUR NOUN ?
    mean, roles = effect_by_role([a, b], [["[CLS]", "NOUN", "?"], ["[CLS]", "NOUN_COLOUR", "NOUN", "?"]])
    assert roles == ["[CLS]", "NOUN", "?", "NOUN_COLOUR"]
    assert torch.equal(mean, torch.tensor([[3.0, 5.5, 7.0, 7.0]]))


def test_symmetric_token_replacement_keeps_the_token_count():
    tokenizer = build_tokenizer()
    assert same_length_replacement(tokenizer, "a red circle", "red", ["blue"]) == "a blue circle"
    with pytest.raises(ValueError, match="no candidate for 'red'"):
        same_length_replacement(tokenizer, "a red circle", "red", ["light blue", "red"])
    with pytest.raises(ValueError, match="is not a word of"):
        same_length_replacement(tokenizer, "a red circle", "green", ["blue"])


def test_probe_run_writes_effects_heatmaps_and_summary(tmp_path, tiny_bundle):
    import json

    from safetensors.torch import load_file

    from m2ib_lightning.config import CONFIG_DIR, load_config
    from m2ib_lightning.tasks.probe import run

    cfg = load_config(CONFIG_DIR / "probe_shapes.yaml", [
        f"output_dir={tmp_path}", f"model.name_or_path={tiny_bundle}", "data.num_pairs=3", "probe.sites=[resid,head]",
    ])
    summary = run(cfg)
    effects = load_file(tmp_path / "effects.safetensors")
    # "head" (the older name) is resolved to self_head when the config is read
    assert set(effects) == {f"{m}/{s}/{k}" for m in ("image", "text") for s in ("resid", "self_head") for k in ("mean", "raw")}
    assert effects["image/resid/mean"].shape == (2, 65) and effects["image/resid/raw"].shape == (3, 2, 65)
    assert effects["image/self_head/mean"].shape == (2, 2)
    # the last layer's residual at the pooled token is all the tower passes on: it restores the clean score
    torch.testing.assert_close(effects["image/resid/mean"][-1, 0], torch.tensor(1.0), atol=1e-3, rtol=0)
    assert {p.name for p in tmp_path.glob("*.png")} == {"image_resid.png", "image_self_head.png", "text_resid.png", "text_self_head.png"}
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["sites"]["image/resid"]["pairs"] == 3 and "universal_heads" in saved
    assert summary["important_heads"].keys() == {f"{a}/{m}" for a in ("colour", "shape", "position") for m in ("image", "text")}


def test_readme_examples_run_as_written(capsys):
    """Every README code block marked '# runs as written' runs as it is."""
    from conftest import ROOT

    blocks = [b.split("```")[0] for b in (ROOT / "README.md").read_text().split("```python\n")[1:]]
    examples = [b for b in blocks if b.startswith("# runs as written")]
    assert len(examples) >= 2
    for block in examples:
        exec(block, {})
    assert "(layers, heads)" not in capsys.readouterr().err


def test_clip_all_heads_at_a_cell_equal_the_whole_attention_block(model, image_pair):
    from m2ib_lightning.probing.patching import _as_dict, site_hooks

    clean, corrupt, choices = image_pair
    probe = ActivationPatching(model)
    whole = probe.run(clean, corrupt, choices, modality="image", site="self_attn")
    adapter = probe.adapter
    sites = [adapter.probe_site("image", "self_head", layer) for layer in range(4)]
    clean_in = {"pixel_values": clean, "choices": _as_dict(choices)}
    corrupt_in = {"pixel_values": corrupt, "choices": _as_dict(choices)}
    cache = probe._cache(sites, clean_in, "image")
    width = cache[0].shape[-1] // sites[0].heads
    for layer, position in [(1, 3), (3, 0)]:
        def edit(at, act, layer=layer, position=position):
            if at == layer:
                for h in range(sites[0].heads):
                    act[0, position, h * width : (h + 1) * width] = cache[layer][position, h * width : (h + 1) * width]

        with site_hooks(sites, edit), torch.no_grad():
            _, ld = probe._scores(adapter.decision_logits(corrupt_in, 1, "image"), (0, 1))
        torch.testing.assert_close(ld[0], whole.patched_ld[layer, position], atol=1e-5, rtol=1e-5)


def test_probing_goes_through_the_family_adapter_and_one_without_probe_sites_is_refused_naming_it(model):
    from m2ib_lightning.backbones import as_backbone
    from m2ib_lightning.backbones.capabilities import MissingCapabilityError
    from m2ib_lightning.backbones.hf_clip import HFCLIPBackbone
    from m2ib_lightning.probing import ProbingAdapter
    from conftest import tiny_siglip

    assert isinstance(ActivationPatching(model).adapter, HFCLIPBackbone)  # the adapter attribution uses
    adapter = as_backbone(model)
    assert ActivationPatching(adapter).adapter is adapter
    with pytest.raises(MissingCapabilityError, match="activation patching needs the adapter's probing capability"):
        ActivationPatching(tiny_siglip())  # no probe sites declared (yet): a clear refusal, not an AttributeError

    class Partial:  # claims probing, lacks members
        capabilities = ("probing",)
        module, probe_towers = model, ("image",)

        def probe_sites(self, tower):
            return ("resid",)

    with pytest.raises(MissingCapabilityError, match="has no default_probe_tower, probe_layers, probe_site"):
        ActivationPatching(Partial())
    assert ActivationPatching(type("Mine", (ProbingAdapter,), {"module": model})()).adapter.module is model


def test_check_backbone_checks_the_probe_sites_an_adapter_declares(model):
    from m2ib_lightning.backbones.capabilities import Site
    from m2ib_lightning.backbones.hf_clip import HFCLIPBackbone
    from m2ib_lightning.testing import BackboneCheckError, _check_probing

    pixels = make_images(2, seed=3)
    ids, mask = make_texts([6, 9], seed=3)
    _check_probing(HFCLIPBackbone(model), pixels, ids, mask)

    class Detached(HFCLIPBackbone):  # a site on a module the decision never runs
        def probe_site(self, tower, name, layer):
            return Site(torch.nn.Linear(2, 2), "output") if name == "mlp" else super().probe_site(tower, name, layer)

    with pytest.raises(BackboneCheckError, match="image site mlp at layer 0 is not a module of the model"):
        _check_probing(Detached(model), pixels, ids, mask)

    class Crossed(HFCLIPBackbone):  # image sites in the text tower, which embeds the choices: rows mix
        def probe_site(self, tower, name, layer):
            return super().probe_site("text", name, layer) if tower == "image" else super().probe_site(tower, name, layer)

    with pytest.raises(BackboneCheckError, match="zeroing image site resid at layer 0 in one row changed another row's"):
        _check_probing(Crossed(model), pixels, ids, mask)
