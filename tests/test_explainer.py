"""The amortised explainer: its data streamed from an exact run's shards, its checkpoints, its refusals, and the
amortised and audited runs through train.py (2 processes = 1, kill and resume)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_runs_agree, make_images, make_texts, tiny_clip, train_main
from test_edges_runs import _main
from m2ib_lightning.amortised import AmortisedM2IB, ExplainerNetwork, map_agreement, new_explainer
from m2ib_lightning.engine import M2IBConfig
from m2ib_lightning.results import index_entries, read_attributions

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
M2IB_ARGS = ("m2ib.vision_layer=0", "m2ib.text_layer=1", "m2ib.steps=2", "m2ib.num_noise=2")


def _train(*args: str) -> None:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run_args(out: Path, bundle: Path, *extra: str) -> tuple[str, ...]:
    return (f"output_dir={out}", f"model.name_or_path={bundle}", *M2IB_ARGS, "export.overlays=0",
            "trainer.enable_progress_bar=false", *extra)


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, tiny_bundle) -> Path:
    out = tmp_path_factory.mktemp("explainer") / "exact"
    assert train_main(*_run_args(out, tiny_bundle, "data.num_samples=16", "data.batch_size=4", "export.samples_per_shard=4")) == 0
    return out


@pytest.fixture(scope="module")
def explainer_dir(exact_run) -> Path:
    out = exact_run.parent / "fit"
    assert train_main(str(ROOT / "configs/fit_explainer.yaml"), f"exact_run={exact_run}", f"output_dir={out}", "data.batch_size=4",
                      "data.num_workers=0", "data.held_out_fraction=0.25", "network.width=16", "network.depth=1",
                      "network.heads=2", "trainer.max_steps=6", "trainer.val_check_interval=3", "optim.warmup_steps=2",
                      "trainer.enable_progress_bar=false") == 0
    return out / "explainer"


def test_the_training_data_streams_from_the_shards_one_at_a_time_with_the_exact_capacities(exact_run, tiny_bundle, monkeypatch, tmp_path):
    import m2ib_lightning.data.explainer as data
    import m2ib_lightning.results.readers as readers
    from m2ib_lightning.tasks.common import backbone_of, source_of
    from m2ib_lightning.tasks.fit_explainer import exact_run_config

    def whole_run(*args, **kwargs):
        raise AssertionError("the whole run was read")

    for name in ("read_attributions", "shard_names"):
        monkeypatch.setattr(readers, name, whole_run)
    loaded = []
    real_load = data.load_file
    monkeypatch.setattr(data, "load_file", lambda path: loaded.append(Path(path).name) or real_load(path))
    monkeypatch.setattr(data, "OPEN_SHARDS", 1)
    run_cfg = exact_run_config(exact_run)
    backbone, source = backbone_of(run_cfg), source_of(run_cfg)
    targets = data.ExactTargets.build(exact_run, tmp_path / "targets.sqlite")
    assert len(targets) == 16
    splits = {}
    for split in ("train", "val"):
        loaded.clear()
        splits[split] = list(data.ExplainerExamples(source, backbone, targets, held_out_fraction=0.25, split=split))
        assert 0 < len(loaded) == len(set(loaded)) <= 4, "a pass in the source's order loads each shard once at most"
    ids = {split: [e["id"] for e in examples] for split, examples in splits.items()}
    assert sorted(ids["train"] + ids["val"]) == sorted(e["id"] for e in index_entries(exact_run))
    assert ids["val"] and ids["train"] and not set(ids["val"]) & set(ids["train"])
    monkeypatch.undo()
    exact = {r.id: r for r in read_attributions(exact_run)}
    for example in splits["train"] + splits["val"]:
        record = exact[example["id"]]
        assert torch.equal(example["target_text"], record.text_capacity)
        assert torch.equal(example["target_image"][1:].view(record.image_capacity.shape), record.image_capacity)


def test_a_saved_explainer_loads_with_equal_maps_and_refuses_another_backbone_or_other_settings(tmp_path):
    model = tiny_clip(seed=5)
    pixels, (ids, mask) = make_images(3, seed=1), make_texts([5, 8, 3], seed=1)
    settings = M2IBConfig(vision_layer=0, text_layer=1, steps=2, num_noise=2)
    network = new_explainer(model, settings, pixels, ids, mask, width=16, depth=1, heads=2, seed=3)
    network.save_pretrained(tmp_path / "explainer")
    loaded = ExplainerNetwork.from_pretrained(tmp_path / "explainer")
    a = AmortisedM2IB(model, network).attribute(pixels, ids, mask)
    b = AmortisedM2IB(model, loaded, m2ib=settings).attribute(pixels, ids, mask)
    assert torch.equal(a.image_maps, b.image_maps) and torch.equal(a.text_maps, b.text_maps)
    assert a.image_maps.std() > 0 and (a.text_capacity[~mask.bool()] == 0).all() and (a.text_capacity[mask.bool()] > 0).any()
    with pytest.raises(ValueError, match="trained for the backbone 'CLIPModel' .* the model given has other weights"):
        AmortisedM2IB(tiny_clip(seed=6), tmp_path / "explainer")
    with pytest.raises(ValueError, match=r"m2ib settings text_layer=0 \(explainer: 1\)"):
        AmortisedM2IB(model, tmp_path / "explainer", m2ib=M2IBConfig(vision_layer=0, text_layer=0, steps=2, num_noise=2))
    with pytest.raises(FileNotFoundError, match="holds no config.json and model.safetensors"):
        ExplainerNetwork.from_pretrained(tmp_path)


def test_a_sample_gets_the_same_amortised_maps_alone_and_in_any_batch():
    model = tiny_clip(seed=5)
    pixels, (ids, mask) = make_images(3, seed=2), make_texts([4, 9, 6], seed=2)
    explainer = AmortisedM2IB(model, new_explainer(model, M2IBConfig(vision_layer=0, text_layer=1), pixels, ids, mask,
                                                   width=16, depth=1, heads=2))
    batch = explainer.attribute(pixels, ids, mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        alone = explainer.attribute(pixels[b : b + 1], ids[b : b + 1, :n], mask[b : b + 1, :n])
        torch.testing.assert_close(alone.image_capacity[0], batch.image_capacity[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.text_capacity[0], batch.text_capacity[b, :n], atol=1e-5, rtol=1e-5)


def test_the_network_runs_off_the_fast_path_with_its_numbers_and_restores_the_switch_also_on_an_error(monkeypatch):
    from m2ib_lightning.amortised.network import encode

    model = tiny_clip(seed=5)
    pixels, (ids, mask) = make_images(3, seed=2), make_texts([4, 9, 6], seed=2)
    network = new_explainer(model, M2IBConfig(vision_layer=0, text_layer=1), pixels, ids, mask, width=16, depth=2, heads=2)
    blocks = network.heads["text"].blocks.eval()
    x = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # PyTorch's inference fast path (nested masked softmax) against the regular one
        torch.testing.assert_close(encode(blocks, x, mask.bool())[mask.bool()],
                                   blocks(x, src_key_padding_mask=~mask.bool())[mask.bool()], atol=1e-5, rtol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()
    monkeypatch.setattr(network.heads["image"].blocks.layers[0], "forward", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        AmortisedM2IB(model, network).attribute(pixels, ids, mask)
    assert torch.backends.mha.get_fastpath_enabled()


def test_map_agreement_is_spearman_per_sample_and_the_peak_in_the_top_region():
    exact = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
    predicted = torch.stack([exact[0] ** 2, exact[0]])  # the same order; the reverse order
    text = torch.tensor([[1.0, 3, 2, 0], [1.0, 2, 0, 0]])
    out = map_agreement(predicted, exact, text, torch.tensor([[1.0, 3, 2, 9], [2.0, 1, 5, 5]]), torch.tensor([3, 2]))
    assert out["image_spearman"].tolist() == pytest.approx([1.0, -1.0], abs=1e-4)
    assert out["text_spearman"].tolist() == pytest.approx([1.0, -1.0], abs=1e-4)  # only each sample's own tokens count
    assert out["image_peak_in_top"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("sharpness", [1.0, 2.0])
def test_the_loss_is_the_squared_log_error_plus_the_kl_of_the_sharpened_capacity_distributions(sharpness):
    from m2ib_lightning.amortised.network import LOG_EPSILON
    from m2ib_lightning.modules.explainer import explainer_loss

    capacity = torch.tensor([[0.5, 2.0, 0.1, 7.0], [1.0, 3.0, 0.0, 0.0]])
    predicted = torch.tensor([[0.2, 0.9, -1.0, 1.5], [0.4, -0.3, 5.0, 5.0]])  # the padding's values must not count
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    squared, kl = 0.0, 0.0
    for b in range(2):
        n = int(mask[b].sum())
        target = (capacity[b, :n] + LOG_EPSILON).log()
        squared += ((predicted[b, :n] - target) ** 2).sum()
        p = (capacity[b, :n] + LOG_EPSILON) ** sharpness
        p = p / p.sum()
        q = predicted[b, :n].mul(sharpness).softmax(0)
        kl += (p * (p / q).log()).sum()
    expected = squared / mask.sum() + 0.5 * kl / 2
    torch.testing.assert_close(explainer_loss(predicted, capacity, mask, 0.5, sharpness), expected, atol=1e-6, rtol=1e-6)


def _amortised_args(out: Path, bundle: Path, explainer: Path, *extra: str) -> tuple[str, ...]:
    return _run_args(out, bundle, f"m2ib.explainer={explainer}", "m2ib.audit_every=3", "world.heldout_seed=5",
                     "data.num_samples=12", "data.batch_size=3", *extra)


def test_an_audited_amortised_run_on_two_processes_gives_the_maps_and_audits_of_one(explainer_dir, tiny_bundle, tmp_path, capsys):
    assert _main(capsys, *_amortised_args(tmp_path / "one", tiny_bundle, explainer_dir)).returncode == 0
    _train(*_amortised_args(tmp_path / "two", tiny_bundle, explainer_dir, "trainer.strategy=ddp", "trainer.devices=2",
                            "trainer.accelerator=cpu"))
    entries = assert_runs_agree(tmp_path / "one", tmp_path / "two", 12, ("image_map", "text_map"))
    assert all(e["image_fit"] is None and e["text_fit"] is None for e in entries.values())  # no fit was run
    audited = [e for e in entries.values() if "audit" in e]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["audit"]["samples"] == len(audited)
    mean = sum(e["audit"]["image_spearman"] for e in audited) / len(audited)
    assert summary["audit"]["image_spearman_mean"] == pytest.approx(mean, abs=1e-4)


def test_an_amortised_run_killed_and_resumed_equals_an_uninterrupted_one(explainer_dir, tiny_bundle, tmp_path, capsys):
    extra = ("data.batch_size=1", "export.samples_per_shard=1", "m2ib.audit_every=1")  # every sample fitted: slow enough
    args = _amortised_args(tmp_path / "killed", tiny_bundle, explainer_dir, *extra)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    index = tmp_path / "killed" / "index-rank0.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and (not index.exists() or len(index.read_text().splitlines()) < 2):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(index.read_text().splitlines())
    assert 2 <= done_before < 12
    threads = torch.get_num_threads()
    assert _main(capsys, *args).returncode == 0  # resumed with the killed run's 1 intra-op thread ...
    assert torch.get_num_threads() == threads  # ... and this process's own count given back after it
    full_args = _amortised_args(tmp_path / "full", tiny_bundle, explainer_dir, *extra, "threads=1")  # the killed run's count
    assert _main(capsys, *full_args).returncode == 0
    killed = {r.id: r for r in read_attributions(tmp_path / "killed")}
    full = {r.id: r for r in read_attributions(tmp_path / "full")}
    assert len([e["id"] for e in index_entries(tmp_path / "killed")]) == len(killed) == len(full) == 12
    for sample_id, record in full.items():
        assert torch.equal(killed[sample_id].image_map, record.image_map)
        assert torch.equal(killed[sample_id].text_capacity, record.text_capacity)


def test_an_explainer_of_another_backbone_is_refused_before_anything_is_written(explainer_dir, tiny_bundle, tmp_path, capsys):
    from transformers import CLIPModel

    other = tmp_path / "other-clip"  # the same architecture and processor, other weights
    shutil.copytree(tiny_bundle, other)
    model = CLIPModel.from_pretrained(other)
    with torch.no_grad():
        model.visual_projection.weight.mul_(2)
    model.save_pretrained(other)
    proc = _main(capsys, *_run_args(tmp_path / "run", other, f"m2ib.explainer={explainer_dir}"))
    assert proc.returncode == 2 and "the model given has other weights" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    proc = _main(capsys, *_run_args(tmp_path / "run", tiny_bundle, "m2ib.audit_every=2"))
    assert proc.returncode == 2 and "audit_every compares an amortised explainer" in proc.stderr
    proc = _main(capsys, *_run_args(tmp_path / "run", tiny_bundle, f"m2ib.explainer={explainer_dir}", "m2ib.text_layer=0"))
    assert proc.returncode == 2 and "text_layer=0 (explainer: 1)" in proc.stderr
    assert not (tmp_path / "run").exists()
