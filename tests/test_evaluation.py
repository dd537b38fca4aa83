"""Methods through the adapter protocol, the evaluator against the metrics' definitions, and the evaluation run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import GREY_SEVEN, ROOT, make_images, make_texts, tiny_blip_itc, tiny_clip, tiny_siglip
from m2ib_lightning.baselines import METHODS, Maps, make_method
from m2ib_lightning.config import ConfigError, load_config
from m2ib_lightning.engine import M2IBConfig
from m2ib_lightning.evaluation import Evaluator, MetricSettings
from m2ib_lightning.metrics import curve_auc, perturbation_curve
from m2ib_lightning.results import read_evaluation
from m2ib_lightning.tasks.evaluate import run

SETTINGS = {
    "m2ib": {"vision_layer": 0, "text_layer": 0, "steps": 2, "num_noise": 2},
    "integrated_gradients": {"steps": 3, "replacement_id": 0},
    "rise": {"masks": 24, "chunk": 10},
}


#: what the evaluation runs here compare: every method but the amortised one, whose explainer is made for one backbone
EXACT_METHODS = sorted(set(METHODS) - {"m2ib_amortised"})


def settings_for(name, model, pixels, ids, mask):
    """SETTINGS, and for the amortised method an untrained explainer made for this very model."""
    if name != "m2ib_amortised":
        return SETTINGS.get(name, {})
    from m2ib_lightning.amortised import new_explainer

    return {"explainer": new_explainer(model, M2IBConfig(**SETTINGS["m2ib"]), pixels, ids, mask, width=16, depth=1, heads=2)}


def _batch(model_name: str):
    pixels = make_images(2, seed=2)
    ids, mask = make_texts([12, 12] if model_name == "siglip" else [5, 8], seed=2)  # SigLIP: fixed length, no padding
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    for b, n in enumerate(mask.sum(1).tolist()):
        special[b, n - 1] = True
    return pixels, ids, mask, special


MODELS = {"clip": lambda: tiny_clip(seed=5), "siglip": lambda: tiny_siglip(seed=5), "blip": lambda: tiny_blip_itc(seed=5)}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_on_every_shipped_adapter_gives_finite_maps_and_leaves_the_model_alone(family, name):
    model = MODELS[family]()
    pixels, ids, mask, special = _batch(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    attention = (model.config._attn_implementation, model.config.vision_config._attn_implementation)
    model.train()
    method = make_method(name, model, **settings_for(name, model, pixels, ids, mask))
    maps = method.attribute(pixels, ids, mask, torch.tensor([1, 2]), special)
    size = pixels.shape[-1]
    assert maps.image.shape == (2, size, size) and torch.isfinite(maps.image).all()
    assert maps.image.min() >= 0 and maps.image.max() <= 1
    assert (maps.text is not None) == method.has_text_map
    if maps.text is not None:
        assert maps.text.shape == ids.shape and torch.isfinite(maps.text).all()
        assert (maps.text[~mask.bool()] == 0).all() and maps.text.max() <= 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert model.training  # its own flag back
    assert (model.config._attn_implementation, model.config.vision_config._attn_implementation) == attention


def test_methods_are_deterministic_per_seed_and_differ_across_seeds():
    model = tiny_clip(seed=5)
    pixels, ids, mask, special = _batch("clip")
    rise = make_method("rise", model, masks=24, chunk=10)
    a = rise.attribute(pixels, ids, mask, torch.tensor([1, 2]), special).image
    assert torch.equal(a, rise.attribute(pixels, ids, mask, torch.tensor([1, 2]), special).image)
    assert not torch.equal(a, rise.attribute(pixels, ids, mask, torch.tensor([3, 4]), special).image)
    with pytest.raises(ValueError, match="unknown attribution method 'nope'"):
        make_method("nope", model)
    with pytest.raises(TypeError, match="takes no settings"):
        make_method("saliency", model, steps=3)


def test_confidence_drop_and_increase_follow_the_definition_on_a_toy_model():
    model = tiny_clip(seed=5).eval()
    pixels, ids, mask, special = _batch("clip")
    words = mask.bool() & ~special
    maps = Maps(torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0)),
                torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) * mask)
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    evaluator = Evaluator(model, MetricSettings(steps=2, replacement_id=0))
    clean = evaluator.scorer.clean(pixels, ids, mask)
    values = evaluator.values(maps, batch, clean, words)
    with torch.no_grad():
        image = F.normalize(model.get_image_features(pixel_values=pixels * maps.image[:, None]).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        s = (F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1) * text).sum(-1)
        s_image = (image * text).sum(-1)
        kept = ids.clone()
        for b in range(2):
            median = maps.text[b][words[b]].median()
            kept[b][words[b] & (maps.text[b] <= median)] = 0
        s_text = (F.normalize(model.get_text_features(input_ids=kept, attention_mask=mask).pooler_output, dim=-1)
                  * F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)).sum(-1)
    torch.testing.assert_close(clean, s, atol=1e-5, rtol=0)
    torch.testing.assert_close(values["image_confidence_drop"], (s - s_image).clamp_min(0) * 100, atol=1e-3, rtol=0)
    torch.testing.assert_close(values["image_confidence_increase"], (s_image > s).float() * 100)
    torch.testing.assert_close(values["text_confidence_drop"], (s - s_text).clamp_min(0) * 100, atol=1e-3, rtol=0)
    torch.testing.assert_close(values["text_confidence_increase"], (s_text > s).float() * 100)


def test_deleting_the_most_salient_patch_first_lowers_a_patch_model_faster():
    """A toy model whose score is a weighted sum of patch means: the map equal to the weights must win."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(4, 4, generator=gen)
    pixel_weights = weights.repeat_interleave(4, 0).repeat_interleave(4, 1)
    score = lambda x: (x.mean(1) * pixel_weights).flatten(1).sum(1)  # noqa: E731
    pixels = torch.rand(3, 3, 16, 16, generator=gen) + 0.5
    faithful, reversed_ = pixel_weights.expand(3, 16, 16), -pixel_weights.expand(3, 16, 16)
    kwargs = dict(mode="deletion", steps=16, unit=4)
    fast = curve_auc(perturbation_curve(score, pixels, faithful, **kwargs))
    slow = curve_auc(perturbation_curve(score, pixels, reversed_, **kwargs))
    assert (fast < slow).all()
    first = perturbation_curve(score, pixels, faithful, **kwargs)[:, 1]
    assert (first < perturbation_curve(score, pixels, reversed_, **kwargs)[:, 1]).all()


def _config(out: Path, bundle: Path, *overrides: str):
    return load_config(ROOT / "configs" / "evaluate_shapes.yaml", [
        f"output_dir={out}", f"model.name_or_path={bundle}", "data.num_samples=6", "data.batch_size=4",
        "m2ib.vision_layer=0", "m2ib.text_layer=0", "m2ib.steps=2", "m2ib.num_noise=2", "metrics.steps=4",
        "baselines.integrated_gradients.steps=3", "baselines.rise.masks=20", "baselines.rise.chunk=10",
        "trainer.enable_progress_bar=false", f"methods=[{','.join(EXACT_METHODS)}]", *overrides,
    ])


def test_evaluation_run_writes_tables_maps_grid_and_tensorboard_and_resumes(tmp_path, tiny_bundle):
    from safetensors.torch import load_file

    full = run(_config(tmp_path / "full", tiny_bundle))
    out = tmp_path / "full"
    assert full["pairs"] == 6 and set(full["methods"]) == set(EXACT_METHODS)
    md = (out / "results.md").read_text()
    assert "| m2ib |" in md and "±" in md and "pointing game ↑" in md and "text conf. drop ↓" in md
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,image_confidence_drop,image_confidence_drop_se") and len(rows) == 1 + len(EXACT_METHODS)
    (shard,) = (out / "shards").glob("*.safetensors")
    tensors = load_file(shard)
    assert tensors["m2ib/image"].shape == (6, 64, 64) and "random/text" in tensors and "saliency/text" not in tensors
    assert (out / "figures" / "methods_grid.png").exists()
    records = list(read_evaluation(out))
    assert len(records) == 6 and set(records[0].maps) == set(EXACT_METHODS)
    image, text = records[0].maps["m2ib"]
    assert image.shape == (64, 64) and text.shape == (len(records[0].tokens),) and records[0].maps["saliency"][1] is None
    assert records[0].values["m2ib"]["pointing_game"] is not None
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    # the mean over classes (the shape a caption names first) of each class's mean hit rate, from the per-sample values
    entries = [json.loads(line) for line in (out / "index-rank0.jsonl").read_text().splitlines()]
    by_class: dict[str, list[float]] = {}
    for entry in entries:
        by_class.setdefault(entry["class"], []).append(entry["values"]["m2ib"]["pointing_game"])
    rates = [sum(v) / len(v) for v in by_class.values()]
    assert len(rates) >= 2 and "pointing game (class mean) ↑" in md
    assert full["methods"]["m2ib"]["pointing_game_class_mean"][0] == pytest.approx(sum(rates) / len(rates), abs=1e-6)

    partial = tmp_path / "partial"
    run(_config(partial, tiny_bundle, "data.num_samples=4"))
    resumed = run(_config(partial, tiny_bundle))
    assert resumed["already_done"] == 4 and resumed["pairs"] == 6
    for method, row in full["methods"].items():
        for metric, value in row.items():
            if metric == "samples_per_s" or value is None:
                assert metric == "samples_per_s" or resumed["methods"][method][metric] is None
            elif metric == "pointing_game_class_mean":  # the resumed table counts the classes of earlier samples
                assert value[0] == pytest.approx(resumed["methods"][method][metric][0], abs=1e-6), method
            elif False:
                assert metric == "samples_per_s" or resumed["methods"][method][metric] is None
            else:
                assert value == pytest.approx(resumed["methods"][method][metric], rel=1e-5, abs=1e-6), (method, metric)
    with pytest.raises(ValueError, match="other `metrics` settings"):
        run(_config(partial, tiny_bundle, "metrics.steps=5"))


@pytest.mark.parametrize("bundle", ["siglip_bundle", "blip_itc_bundle"])
def test_every_method_runs_under_predict_on_other_families_and_a_manifest_gives_faithfulness_only(request, tmp_path, bundle):
    import numpy as np
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"id": f"p{i}", "image": f"{i}.png", "text": "a red circle"} for i in range(3)]
    rows[1]["boxes"] = [[0, 0, 10, 10]]
    rows[2]["boxes"] = [[5, 5, 20, 30]]
    rows[1]["class"], rows[2]["class"] = "circle", "nope"
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = run(_config(tmp_path / "run", request.getfixturevalue(bundle), f"data.manifest={tmp_path / 'm.jsonl'}",
                          "data.batch_size=3", "m2ib.vision_layer=-1", "m2ib.text_layer=-1", "metrics.classes=[circle,square]"))
    # one class seen: its rate is p1's score; a class outside metrics.classes is a warning, not a lost sample
    lines = {e["id"]: e for e in map(json.loads, (tmp_path / "run" / "index-rank0.jsonl").read_text().splitlines())}
    p1 = lines["p1"]["values"]["m2ib"]["pointing_game"]
    assert summary["methods"]["m2ib"]["pointing_game_class_mean"] == [pytest.approx(p1), None]
    assert lines["p1"]["class"] == "circle" and "class" not in lines["p2"]
    failures = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["severity"]) for f in failures] == [("p2", "warning")] and "'nope'" in failures[0]["reason"]
    md = (tmp_path / "run" / "results.md").read_text()
    assert summary["pairs"] == 3 and "image conf. drop" in md and set(summary["methods"]) == set(EXACT_METHODS)
    # p1 and p2 have boxes: localisation scores those samples of the batch, p0 has none
    assert summary["methods"]["m2ib"]["pointing_game"][1] is not None and "± n/a" in md  # the class mean of 1 class
    assert lines["p0"]["values"]["m2ib"]["pointing_game"] is None and lines["p1"]["values"]["m2ib"]["pointing_game"] is not None
    for method, row in summary["methods"].items():
        assert row["samples"] == 3
        values = [v for k, v in row.items() if k not in ("samples", "samples_per_s") and v is not None]
        localisation = ("pointing_game", "pointing_game_class_mean", "energy", "top_k_iou")
        assert values and all(math.isfinite(x) for k, pair in row.items() if k not in ("samples", "samples_per_s")
                              and pair is not None for x in (pair[:1] if k in localisation else pair)), method


def test_unknown_methods_and_settings_exit_2(tmp_path, tiny_bundle, capsys):
    from test_edges_runs import _main  # train.py's main in this process

    for override, message in (("methods=[m2ib,nope]", "methods: unknown ['nope']"),
                              ("baselines.rise.bogus=1", "baselines.rise: ")):
        proc = _main(capsys, "configs/evaluate_shapes.yaml", f"output_dir={tmp_path / 'x'}", f"model.name_or_path={tiny_bundle}",
                     override)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_on_the_shipped_clip_m2ib_beats_random_by_more_than_twice_the_standard_error(tmp_path):
    summary = run(load_config(ROOT / "configs" / "evaluate_shapes.yaml", [
        f"output_dir={tmp_path / 'run'}", "data.num_samples=32", "methods=[m2ib,random]", "baselines={}",
        "metrics.steps=8", "trainer.enable_progress_bar=false", "m2ib.batch_invariant=false",
    ]))
    m2ib, random = summary["methods"]["m2ib"], summary["methods"]["random"]
    for metric in ("pointing_game", "image_insertion_auc"):
        (mean, se), (floor, floor_se) = m2ib[metric], random[metric]
        assert mean - floor > 2 * (se**2 + floor_se**2) ** 0.5, (metric, m2ib[metric], random[metric])


def test_a_sample_the_model_refuses_is_listed_and_the_rest_of_its_batch_is_scored(tmp_path, tiny_bundle, nan_for_grey_seven):
    from PIL import Image

    Image.new("RGB", (64, 64), GREY_SEVEN).save(tmp_path / "bad.png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "good.png")
    rows = [{"id": f"p{i}", "image": "bad.png" if i == 1 else "good.png", "text": "a red circle"} for i in range(3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(_config(tmp_path / "run", tiny_bundle, f"data.manifest={tmp_path / 'm.jsonl'}", "methods=[saliency,random]"))
    assert summary["pairs"] == 2 and summary["failed"] == 1
    (failure,) = map(json.loads, (tmp_path / "run" / "failures.jsonl").read_text().splitlines())
    assert failure["id"] == "p1" and "NaN" in failure["reason"]


def test_maps_made_elsewhere_are_scored_on_the_same_table_and_ids_without_one_are_listed(tmp_path, tiny_bundle):
    """A user's tool wrote the ground-truth masks as maps (at twice the size) for all but one sample: they land in the
    table as method ``oracle``, with a pointing game of exactly 1 over the samples they cover."""
    import numpy as np

    from m2ib_lightning.tasks.common import source_of

    cfg = _config(tmp_path / "run", tiny_bundle)
    records = list(source_of(cfg).split(0, 1))
    maps = tmp_path / "maps"
    maps.mkdir()
    for record in records[1:]:
        np.save(maps / f"{record.id}.npy", np.kron(np.asarray(record.load_mask(), dtype=np.float32), np.ones((2, 2))))
    summary = run(_config(tmp_path / "run", tiny_bundle, "methods=[random,oracle]", f"baselines.oracle.maps={maps}"))
    oracle, random_ = summary["methods"]["oracle"], summary["methods"]["random"]
    assert oracle["samples"] == len(records) - 1 and random_["samples"] == len(records)
    assert oracle["pointing_game"][0] == 1.0 and random_["pointing_game"][0] < 1.0
    missing = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert [(m["id"], m["severity"]) for m in missing] == [(records[0].id, "warning")]
    assert "method 'oracle': no " in missing[0]["reason"]
    with pytest.raises(ConfigError, match="baselines.elsewhere: maps="):
        run(_config(tmp_path / "other", tiny_bundle, "methods=[elsewhere]", f"baselines.elsewhere.maps={tmp_path / 'nope'}"))


def test_maps_made_elsewhere_from_safetensors_with_text_maps_and_ids_that_would_leave_the_directory(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from m2ib_lightning.baselines import ExternalMaps

    model = tiny_clip(seed=0)
    pixels, (ids, mask) = make_images(2, seed=1), make_texts([5, 7], seed=1)
    hot = torch.zeros(8, 8)
    hot[2, 5] = 3.0
    save_file({"a/image": hot, "a/text": torch.arange(5.0)}, str(tmp_path / "maps.safetensors"))
    method = ExternalMaps(model, maps=str(tmp_path / "maps.safetensors"), name="mine")
    maps = method.attribute(pixels, ids, mask, torch.zeros(2, dtype=torch.long), ids=["a", "b"])
    assert method.has_text_map and set(maps.missing) == {1} and "no b/image" in maps.missing[1]
    size = pixels.shape[-1]
    peak = divmod(int(maps.image[0].argmax()), size)
    assert (peak[0] * 8 // size, peak[1] * 8 // size) == (2, 5) and float(maps.image[0].max()) == 1.0
    torch.testing.assert_close(maps.text[0, :5], torch.arange(5.0) / 4)
    assert bool(maps.text[0, 5:].eq(0).all()) and bool(maps.image[1].isnan().all())

    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "secret.npy", np.ones((4, 4), dtype=np.float32))
    method = ExternalMaps(model, maps=str(tmp_path / "dir"), name="mine")
    maps = method.attribute(pixels, ids, mask, torch.zeros(2, dtype=torch.long), ids=["../secret", "b"])
    assert "outside" in maps.missing[0] and "no b.npy or b.png" in maps.missing[1]
