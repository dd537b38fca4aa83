"""Attribution runs through train.py on every family: a manifest with a SigLIP, a BLIP-ITC and a plain-torch
checkpoint, adapter and layer errors, per-sample failures inside a batch, and BOM CSV manifests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GREY_SEVEN, ROOT, tiny_plain
from m2ib_lightning import read_attributions
from m2ib_lightning.config import load_config
from m2ib_lightning.data.manifest import read_pairs
from m2ib_lightning.tasks.attribute import run
from test_edges_runs import _main

def _manifest(tmp_path: Path, count: int = 5) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    captions = ["a red circle", "a blue square left of a green cross", "a small yellow diamond", "an orange triangle", "a purple cross"]
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(json.dumps({"id": f"pair-{i}", "image": f"images/{i}.png", "text": captions[i % len(captions)]}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_args(out: Path, manifest: Path, model: Path | str, *extra: str) -> list[str]:
    return [
        str(ROOT / "configs" / "clip_manifest.yaml"), f"output_dir={out}", f"data.manifest={manifest}",
        f"model.name_or_path={model}", "m2ib.vision_layer=-2", "m2ib.text_layer=0", "m2ib.steps=3", "m2ib.num_noise=2",
        "data.batch_size=3", "data.num_workers=0", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "trainer.devices=1", "export.tensorboard_every_n_batches=1", *extra,
    ]


@pytest.mark.parametrize("bundle", ["siglip_bundle", "blip_itc_bundle"])
def test_manifest_run_end_to_end_on_another_family(request, tmp_path, bundle, capsys):
    out = tmp_path / "run"
    proc = _main(capsys, *_run_args(out, _manifest(tmp_path), request.getfixturevalue(bundle), "export.overlays=5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 5 and summary["failed"] == 0
    records = {r.id: r for r in read_attributions(out)}
    assert set(records) == {f"pair-{i}" for i in range(5)}
    for record in records.values():
        assert record.image_map.shape == (32, 32) and record.image_map.max() == 1
        assert torch.isfinite(record.text_capacity).all()
    assert len(list((out / "overlays" / "rank0").glob("*.png"))) == 5
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))


def test_a_users_own_adapter_by_dotted_path(tmp_path, capsys):
    """tests/ is on this process's path (conftest), as PYTHONPATH puts a user's module on theirs."""
    from safetensors.torch import save_file

    model_dir = tmp_path / "plain"
    model_dir.mkdir()
    save_file(tiny_plain(seed=1).state_dict(), str(model_dir / "weights.safetensors"))
    out = tmp_path / "run"
    proc = _main(capsys, *_run_args(out, _manifest(tmp_path, 4), model_dir, "model.adapter=plain_dual_encoder:PlainAdapter"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = list(read_attributions(out))
    assert len(records) == 4 and all(r.image_map.shape == (16, 16) for r in records)
    assert records[0].tokens[0] == "<bos>" and records[0].tokens[-1] == "<eos>"


def test_unknown_adapter_exits_2_listing_the_registered_ones(tmp_path, tiny_bundle, capsys):
    proc = _main(capsys, *_run_args(tmp_path / "never", _manifest(tmp_path, 1), tiny_bundle, "model.adapter=hf_nope"))
    assert proc.returncode == 2
    assert "model.adapter='hf_nope'" in proc.stderr and "hf_blip_itc, hf_blip_vqa, hf_clip, hf_llava, hf_qwen2_vl, hf_siglip" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_a_layer_out_of_range_exits_2_naming_the_key_and_range(tmp_path, tiny_bundle, capsys):
    proc = _main(capsys, *_run_args(tmp_path / "never", _manifest(tmp_path, 1), tiny_bundle, "m2ib.vision_layer=7"))
    assert proc.returncode == 2
    assert "m2ib.vision_layer=7 is out of range" in proc.stderr and "0..1 (or -2..-1" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_a_sample_failing_inside_the_fit_is_listed_and_the_batch_goes_on(tmp_path, tiny_bundle, nan_for_grey_seven):
    manifest = _manifest(tmp_path, 5)
    Image.new("RGB", (40, 48), GREY_SEVEN).save(tmp_path / "images" / "2.png")
    cfg = load_config(ROOT / "configs" / "clip_manifest.yaml", _run_args(tmp_path / "run", manifest, tiny_bundle)[1:])
    summary = run(cfg)
    assert summary["done"] == 4 and summary["failed"] == 1
    failures = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"id": "pair-2", "reason": "pixel_values holds NaN or infinite values", "severity": "error"}]
    assert {r.id for r in read_attributions(tmp_path / "run")} == {"pair-0", "pair-1", "pair-3", "pair-4"}


def test_excel_csv_with_byte_order_mark_reads(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "text"])
        writer.writerow(["first", "a.png", "a red circle"])
    records, failures = read_pairs(tmp_path / "pairs.csv")
    assert (tmp_path / "pairs.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert failures == [] and [(r.id, r.text) for r in records] == [("first", "a red circle")]
