"""Manifests, COCO captions and folders; every kind of bad record is reported and never stops the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2ib_lightning.config import ConfigError, load_config
from m2ib_lightning.data.manifest import load_rgb, read_pairs, to_rgb
from m2ib_lightning.data.records import BadImage
from m2ib_lightning.results import read_attributions
from m2ib_lightning.tasks.attribute import run


def _rgb(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _zero_width_png(path: Path) -> None:
    """A PNG whose header says 0 x 10 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture
def messy_manifest(tmp_path) -> tuple[Path, set[str], dict[str, str]]:
    """Good records in every colour mode, and one of each kind of bad record."""
    images = tmp_path / "images"
    images.mkdir()
    rows, good, bad = [], set(), {}

    def add(sample_id, image, text, expect=None):
        rows.append({"id": sample_id, "image": image, "text": text})
        if expect:
            bad[sample_id] = expect
        else:
            good.add(sample_id)

    base = _rgb(0)
    for mode in ("RGB", "L", "LA", "P", "RGBA"):
        base.convert(mode).save(images / f"{mode}.png")
        add(f"mode-{mode}", f"images/{mode}.png", "a red circle")
    base.convert("CMYK").save(images / "cmyk.jpg")
    add("mode-CMYK", "images/cmyk.jpg", "a blue square")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(images / "deep.png")  # mode I;16
    add("mode-I16", "images/deep.png", "a green cross")
    add("long-caption", "images/RGB.png", " ".join(["a large red circle left of a small blue square"] * 3))
    add("unknown-words", "images/RGB.png", "zebra giraffe")  # attributed, with a warning: no word is in the vocabulary

    add("missing", "images/nowhere.png", "a red circle", "image not found")
    (images / "text.png").write_text("this is not an image")
    add("unreadable", "images/text.png", "a red circle", "not a readable image")
    data = (images / "RGB.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    add("truncated", "images/truncated.png", "a red circle", "corrupt or truncated")
    _zero_width_png(images / "zero.png")
    add("zero-size", "images/zero.png", "a red circle", "image")
    add("empty-caption", "images/RGB.png", "   ", "empty caption")
    add("mode-RGB", "images/L.png", "a duplicate", "duplicate id")

    manifest = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    bad[f"line {len(rows) + 1}"] = "invalid JSON"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, good, bad


def test_bad_records_are_reported_and_good_ones_all_attributed(tmp_path, tiny_bundle, messy_manifest):
    manifest, good, bad = messy_manifest
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"data.manifest={manifest}", f"model.name_or_path={tiny_bundle}",
        "data.batch_size=4", "m2ib.vision_layer=0", "m2ib.text_layer=0", "m2ib.steps=2", "m2ib.num_noise=2",
        "trainer.enable_progress_bar=false",
    ])
    summary = run(cfg)
    assert {r.id for r in read_attributions(tmp_path / "run")} == good
    assert summary["done"] == len(good) and summary["failed"] == len(bad) and summary["warnings"] == 2
    assert summary["localisation"] is None
    reports = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    errors = {r["id"]: r["reason"] for r in reports if r["severity"] == "error"}
    assert set(errors) == set(bad)
    for sample_id, expected in bad.items():
        assert expected in errors[sample_id], (sample_id, errors[sample_id])
    warnings = {r["id"]: r["reason"] for r in reports if r["severity"] == "warning"}
    assert set(warnings) == {"long-caption", "unknown-words"} and "truncated" in warnings["long-caption"]
    assert "unknown tokens only" in warnings["unknown-words"]


def test_failed_records_are_not_duplicated_on_rerun(tmp_path, tiny_bundle, messy_manifest):
    manifest, good, bad = messy_manifest
    args = [
        f"output_dir={tmp_path / 'run'}", f"data.manifest={manifest}", f"model.name_or_path={tiny_bundle}",
        "m2ib.vision_layer=0", "m2ib.text_layer=0", "m2ib.steps=1", "m2ib.num_noise=1", "trainer.enable_progress_bar=false",
    ]
    run(load_config(None, args))
    summary = run(load_config(None, args))
    assert summary["done"] == 0 and summary["skipped"] == len(good) and summary["failed"] == len(bad)
    reports = (tmp_path / "run" / "failures.jsonl").read_text().splitlines()
    assert len(reports) == len(bad) + 2  # and the two warnings of the first run


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_8_bit_rgb(mode):
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L").convert(mode)
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (8, 8)
    assert np.asarray(converted).std() > 0


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


def test_load_rgb_reasons(tmp_path):
    with pytest.raises(BadImage, match="image not found"):
        load_rgb(tmp_path / "none.png")


def test_coco_and_folder_and_csv_sources(tmp_path):
    _rgb(1).save(tmp_path / "a.png")
    _rgb(2).save(tmp_path / "b.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "one"}, {"id": 11, "image_id": 2, "caption": "two"},
                        {"id": 12, "image_id": 3, "caption": "no image"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    records, failures = read_pairs(tmp_path / "captions.json")
    assert [(r.id, r.text) for r in records] == [("10", "one"), ("11", "two")]
    assert [f.id for f in failures] == ["12"]
    assert records[0].load_image().size == (40, 30)

    (tmp_path / "captions.txt").write_text("a.png\tfirst\nb.png\tsecond\n")
    records, failures = read_pairs(tmp_path)
    assert [(r.id, r.text) for r in records] == [("a", "first"), ("b", "second")] and not failures

    (tmp_path / "pairs.csv").write_text("id,image,text\nx,a.png,hello\n")
    records, _ = read_pairs(tmp_path / "pairs.csv")
    assert [(r.id, r.text) for r in records] == [("x", "hello")]
    (tmp_path / "bad.csv").write_text("name,file\nx,a.png\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['id', 'image', 'text'\]"):
        read_pairs(tmp_path / "bad.csv")


def test_manifest_config_needs_the_manifest():
    with pytest.raises(ConfigError, match=r"config keys \['data.manifest'\] must be set"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / "clip_manifest.yaml")
