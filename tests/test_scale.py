"""Runs at scale, in miniature: rolling shards, streaming (no read-back), WebDataset input, permissions,
original-size maps, packaging, and the GPU-ready fitting options on CPU."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_images, make_texts, write_tar
from m2ib_lightning import attribute, read_attributions, results
from m2ib_lightning.config import load_config
from m2ib_lightning.data.attribution import WorldSource
from m2ib_lightning.data.manifest import ManifestSource
from m2ib_lightning.data.records import Failure
from m2ib_lightning.data.webdataset import WebDatasetSource
from m2ib_lightning.shapes.world import ShapesWorld
from m2ib_lightning.results import done_ids, shard_names
from m2ib_lightning.tasks.attribute import run
from test_edges_runs import _main


def _config(out: Path, bundle: Path, *overrides: str):
    return load_config(None, [
        f"output_dir={out}", f"model.name_or_path={bundle}", "data.num_samples=10", "data.batch_size=3",
        "m2ib.vision_layer=0", "m2ib.text_layer=0", "m2ib.steps=2", "m2ib.num_noise=2",
        "trainer.enable_progress_bar=false", *overrides,
    ])


def test_shards_roll_every_samples_per_shard_and_read_one_at_a_time(tmp_path, tiny_bundle):
    run(_config(tmp_path / "run", tiny_bundle, "export.samples_per_shard=4", "export.overlays=3"))
    names = shard_names(tmp_path / "run")
    assert len(names) == len(list((tmp_path / "run" / "shards").glob("*.safetensors"))) == 3  # 4 + 4 + 2 samples
    sizes = [len(list(read_attributions(tmp_path / "run", shard=n))) for n in names]
    assert sizes == [4, 4, 2]
    assert len(list((tmp_path / "run" / "overlays" / "rank0").glob("*.png"))) == 3


def test_shards_also_close_on_a_time_budget(tmp_path, tiny_bundle, monkeypatch):
    """With a slow model, a shard closes once its first sample is export.shard_seconds old, whatever its size."""
    import m2ib_lightning.callbacks.attribution_writer as writer

    clock = iter(range(0, 10_000, 100))  # each reading of the clock: 100 s later
    monkeypatch.setattr(writer.time, "monotonic", lambda: float(next(clock)))
    run(_config(tmp_path / "run", tiny_bundle, "export.shard_seconds=150"))
    sizes = [len(list(read_attributions(tmp_path / "run", shard=n))) for n in shard_names(tmp_path / "run")]
    # batches of 3: the clock reads 100 s later at each shard's first sample and at each batch's end, so a shard is
    # 100 s old after its first batch and 200 s (> 150) after its second: two batches per shard, not 1024 samples
    assert sizes == [6, 4]
    with pytest.raises(Exception, match="export.shard_seconds=0"):
        run(_config(tmp_path / "bad", tiny_bundle, "export.shard_seconds=0"))


def test_the_end_of_a_run_never_reads_the_output_back(tmp_path, tiny_bundle, monkeypatch):
    run(_config(tmp_path / "run", tiny_bundle, "data.num_samples=4"))  # something to skip at start-up

    def forbidden(*args, **kwargs):
        raise AssertionError("the run read its output back")

    from m2ib_lightning.results import readers

    for name in ("read_attributions", "index_entries", "shard_names"):
        monkeypatch.setattr(results, name, forbidden)  # as the package exports them
    for name in ("read_attributions", "index_entries", "shard_names", "load_file"):
        monkeypatch.setattr(readers, name, forbidden)  # where they are defined, and the shard reader they use
    summary = run(_config(tmp_path / "run", tiny_bundle))
    assert summary["done"] == 6 and summary["skipped"] == 4 and summary["total_in_output"] == 10
    assert summary["localisation"]["m2ib"]["pointing_game"] >= 0  # from running metrics of this run


def test_files_get_the_permissions_of_the_umask(tmp_path, tiny_bundle):
    old = os.umask(0o022)
    try:
        run(_config(tmp_path / "run", tiny_bundle, "data.num_samples=2", "export.overlays=1"))
    finally:
        os.umask(old)
    out = tmp_path / "run"
    files = [*out.glob("shards/*"), *out.glob("overlays/rank0/*"), out / "index-rank0.jsonl", out / "summary.json",
             out / "config.yaml", out / "failures.jsonl"]
    assert len(files) == 6
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_output_dir_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    proc = _main(capsys, f"output_dir={tmp_path / 'file'}")
    assert proc.returncode == 2 and "is a file, not a directory" in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=-1", "data.batch_size=-1: must be >= 1"),
    ("data.num_workers=-2", "data.num_workers=-2: must be >= 0"),
    ("export.samples_per_shard=0", "export.samples_per_shard=0: must be >= 1"),
    ("m2ib.noise_device=gpu", "noise_device must be 'cpu' or 'auto'"),
    ("m2ib.precision=16", "precision must be '32' or 'bf16'"),
])
def test_out_of_range_values_exit_2_naming_the_key(tmp_path, capsys, override, message):
    proc = _main(capsys, f"output_dir={tmp_path / 'never'}", override)  # train.py's main, in this process
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "never").exists()


def test_help_lists_tasks_keys_and_defaults():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for line in ("task=attribute:", "task=probe_vqa:", "export.samples_per_shard=1024", "m2ib.precision=32",
                 "data.webdataset=None", "m2ib.noise_device=cpu"):
        assert line in proc.stdout


def test_a_configs_help_shows_the_values_it_gives_every_key(capsys):
    proc = _main(capsys, "configs/fit_shapes_llava.yaml", "model.layers=6", "--help")
    assert proc.returncode == 0 and "(task=fit_llava)" in proc.stdout
    for line in ("  model.layers=6", "  vision_from=builtin:shapes-clip", "  optim.warmup_steps=300"):
        assert line in proc.stdout.splitlines()
    assert "task=attribute:" not in proc.stdout  # the one task of this config, not every schema
    proc = _main(capsys, "configs/fit_shapes_llava.yaml", "model.nope=1", "--help")
    assert proc.returncode == 2 and "model.nope" in proc.stderr


def test_callbacks_install_inside_the_package_namespace(tmp_path):
    code = "import importlib.util, m2ib_lightning.callbacks as c; print(c.AttributionWriter.__name__, importlib.util.find_spec('callbacks'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AttributionWriter", "None"]  # no top-level `callbacks` in site-packages


# ----------------------------------------------------------------------------------- sources
def _jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path) -> tuple[str, set[str], dict[str, str]]:
    """Two tar shards as img2dataset writes them, with a corrupt image and a missing caption."""
    write_tar(tmp_path / "00000.tar", {
        "000000001.jpg": _jpeg(1), "000000001.txt": b"a red circle",
        "000000002.jpg": _jpeg(2), "000000002.json": json.dumps({"caption": "a blue square", "url": "x"}).encode(),
        "000000003.jpg": b"not a jpeg at all", "000000003.txt": b"a corrupt member",
    })
    write_tar(tmp_path / "00001.tar", {
        "000000004.jpg": _jpeg(4), "000000004.txt": b"a green cross",
        "000000005.jpg": _jpeg(5), "000000005.json": json.dumps({"url": "no caption"}).encode(),
        "000000006.png": _jpeg(6), "000000006.txt": b"a small triangle",
    })
    bad = {"00000/000000003": "not a readable image", "00001/000000005": "no caption"}
    return str(tmp_path / "{00000..00001}.tar"), {"00000/000000001", "00000/000000002", "00001/000000004", "00001/000000006"}, bad


def test_webdataset_run_attributes_good_samples_reports_bad_ones_and_resumes(tmp_path, tiny_bundle, shards):
    pattern, good, bad = shards
    args = ("data.num_samples=1", f"data.webdataset={pattern}", "data.num_workers=2", "data.batch_size=2")
    summary = run(_config(tmp_path / "run", tiny_bundle, *args))
    assert {r.id for r in read_attributions(tmp_path / "run")} == good
    assert summary["done"] == 4 and summary["failed"] == 2 and summary["localisation"] is None
    reports = {r["id"]: r["reason"] for r in map(json.loads, (tmp_path / "run" / "failures.jsonl").read_text().splitlines())}
    assert set(reports) == set(bad)
    for key, reason in bad.items():
        assert reason in reports[key]
    again = run(_config(tmp_path / "run", tiny_bundle, *args))
    assert again["done"] == 0 and again["skipped"] == 4 and again["failed"] == 2


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_webdataset_shares_are_disjoint_and_complete(shards, slots):
    pattern, good, bad = shards
    source = WebDatasetSource(pattern)
    shares = [[e.id for e in source.split(slot, slots)] for slot in range(slots)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == sorted(good | set(bad)) and len(flat) == len(set(flat))
    assert [e.id for e in source.split(0, 1, skip={"00000/000000001"})].count("00000/000000001") == 0


def test_a_truncated_tar_is_reported_and_the_run_goes_on(tmp_path):
    write_tar(tmp_path / "00000.tar", {f"{i:09d}.jpg": _jpeg(i) for i in range(4)} | {f"{i:09d}.txt": b"x" for i in range(4)})
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2 + 100])
    entries = list(WebDatasetSource(str(tmp_path / "00000.tar")).split(0, 1))
    assert any(isinstance(e, Failure) for e in entries)


def test_manifest_shares_are_disjoint_and_read_lazily(tmp_path):
    lines = [json.dumps({"id": f"p{i}", "image": f"missing-{i}.png", "text": "a caption"}) for i in range(7)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    source = ManifestSource(tmp_path / "m.jsonl")  # images are not checked up front: they fail when loaded
    shares = [[e.id for e in source.split(slot, 3)] for slot in range(3)]
    assert sorted(i for s in shares for i in s) == sorted(f"p{i}" for i in range(7))
    assert all(share == sorted(share, key=lambda i: int(i[1:])) for share in shares)  # manifest order within a share
    assert shares == [[f"p{i}" for i in range(7) if zlib.crc32(f"p{i}".encode()) % 3 == slot] for slot in range(3)]
    assert source.size_hint() == 7
    stream = source.split(0, 1)
    assert next(stream).id == "p0"
    (tmp_path / "m.jsonl").write_text("")  # a lazy reader already holds its file; nothing was read ahead into a list


def test_done_ids_reads_only_ids_and_skips_a_partial_line(tmp_path):
    index = tmp_path / "index-rank0.jsonl"
    index.write_text('{"id": "a\\"b", "text": "x"}\n{"id": "c", "tokens": ["{\\"id\\": \\"zz\\"}"]}\n{"id": "half')
    assert done_ids(tmp_path) == {'a"b', "c"}
    results.cut_partial_line(index)
    assert index.read_text().endswith("}\n") and len(index.read_text().splitlines()) == 2


def test_world_source_skips_done_ids_before_drawing():
    source = WorldSource(ShapesWorld(seed=1), 6)
    assert [r.id for r in source.split(1, 2, skip={"shapes-1-3"})] == ["shapes-1-1", "shapes-1-5"]


# ------------------------------------------------------------------------- original size
def test_an_attribution_run_scores_localisation_on_manifest_boxes(tmp_path, tiny_bundle):
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "gray.png")
    rows = [{"id": "boxed", "image": "gray.png", "text": "a red circle", "boxes": [[0, 0, 32, 32]]},
            {"id": "plain", "image": "gray.png", "text": "a red circle"},
            {"id": "bad-box", "image": "gray.png", "text": "a red circle", "boxes": "[1, 2]"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(_config(tmp_path / "run", tiny_bundle, f"data.manifest={tmp_path / 'm.jsonl'}"))
    assert summary["done"] == 2 and summary["failed"] == 1 and summary["localisation_pairs"] == 1
    assert set(summary["localisation"]) == {"m2ib", "random"}
    reasons = (tmp_path / "run" / "failures.jsonl").read_text()
    assert "boxes must be a non-empty list" in reasons


def test_maps_go_back_onto_the_original_photo(tmp_path, tiny_bundle):
    from m2ib_lightning.backbones import load_backbone

    backbone = load_backbone(str(tiny_bundle))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 96, 3), dtype=np.uint8))  # 96 wide, 48 high
    geometry = backbone.image_geometry(photo)
    assert geometry.original == (48, 96) and geometry.resized == (64, 128) and geometry.crop == (0, 32, 64, 64)
    # The geometry is what the processor did: resizing and cropping by hand gives its pixels.
    by_hand = backbone.image_inputs(photo.resize((128, 64), Image.BICUBIC).crop((32, 0, 96, 64)))
    torch.testing.assert_close(by_hand, backbone.image_inputs(photo), atol=0.05, rtol=0)
    back = geometry.to_original(torch.ones(64, 64))
    assert back.shape == (48, 96)
    assert back[:, 30:66].min() == 1 and back[:, :20].max() == 0 and back[:, 76:].max() == 0

    photo.save(tmp_path / "wide.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "wide", "image": "wide.png", "text": "a red circle"}) + "\n")
    run(_config(tmp_path / "run", tiny_bundle, f"data.manifest={tmp_path / 'm.jsonl'}"))
    (record,) = read_attributions(tmp_path / "run", original_size=True)
    (model_sized,) = read_attributions(tmp_path / "run")
    assert record.image_map.shape == (48, 96) and model_sized.image_map.shape == (64, 64)
    torch.testing.assert_close(record.image_map, geometry.to_original(model_sized.image_map))


# ------------------------------------------------------------------- GPU-ready fitting
def test_noise_device_auto_on_cpu_is_the_cpu_stream(clip):
    pixels, (ids, mask) = make_images(2), make_texts([5, 7])
    kwargs = dict(vision_layer=1, text_layer=1, steps=3, num_noise=2, seed=torch.tensor([3, 4]))
    cpu = attribute(clip, pixels, ids, mask, noise_device="cpu", **kwargs)
    auto = attribute(clip, pixels, ids, mask, noise_device="auto", **kwargs)
    assert torch.equal(cpu.image_maps, auto.image_maps) and torch.equal(cpu.text_maps, auto.text_maps)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.flatten().argsort().argsort().double()


def test_bf16_keeps_the_maps_close_and_the_fit_in_float32(clip):
    pixels, (ids, mask) = make_images(2), make_texts([5, 7])
    kwargs = dict(vision_layer=1, text_layer=1, steps=4, num_noise=2, seed=torch.tensor([3, 4]))
    exact = attribute(clip, pixels, ids, mask, **kwargs)
    bf16 = attribute(clip, pixels, ids, mask, precision="bf16", **kwargs)
    assert bf16.image_capacity.dtype == torch.float32 and bf16.curves["image/fit"].dtype == torch.float32
    assert not torch.equal(exact.image_capacity, bf16.image_capacity)  # the tail did run in bf16
    for b in range(2):
        rho = torch.corrcoef(torch.stack([_ranks(exact.image_capacity[b]), _ranks(bf16.image_capacity[b])]))[0, 1]
        assert rho > 0.9, rho
    torch.testing.assert_close(exact.curves["image/fit"], bf16.curves["image/fit"], atol=0.05, rtol=0)


def test_a_rerun_passes_over_finished_tars_without_reading_their_samples(tmp_path, monkeypatch):
    import webdataset

    write_tar(tmp_path / "00000.tar", {f"{i:09d}.jpg": _jpeg(i) for i in range(3)} | {f"{i:09d}.txt": b"x" for i in range(3)})
    source = WebDatasetSource(str(tmp_path / "00000.tar"))
    keys = {e.id for e in source.split(0, 1)}
    assert len(keys) == 3

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished tar was read")

    monkeypatch.setattr(webdataset.tariterators, "tarfile_samples", forbidden)
    assert list(source.split(0, 1, skip=keys)) == []
    with pytest.raises(AssertionError, match="a finished tar was read"):
        list(source.split(0, 1, skip=keys - {"00000/000000001"}))


def test_an_evaluation_reads_webdataset_shards_too(tmp_path, tiny_bundle, shards):
    from m2ib_lightning.tasks.evaluate import run as evaluate

    pattern, good, bad = shards
    summary = evaluate(load_config(ROOT / "configs" / "evaluate_shapes.yaml", [
        f"output_dir={tmp_path / 'eval'}", f"model.name_or_path={tiny_bundle}", f"data.webdataset={pattern}",
        "methods=[saliency,random]", "metrics.steps=2", "trainer.enable_progress_bar=false",
    ]))
    assert summary["pairs"] == len(good) and summary["failed"] == len(bad)
    assert summary["methods"]["random"]["pointing_game"] is None  # no ground truth in the tars
