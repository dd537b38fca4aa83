"""Inputs users bring: bytes that are not UTF-8, blank ids, phone photos, paths that point anywhere, WebDataset keys."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_tar
from m2ib_lightning.config import load_config
from m2ib_lightning.data.manifest import EXIF_ORIENTATION, ManifestSource, load_rgb, owner_slot, read_pairs
from m2ib_lightning.data.records import Failure
from m2ib_lightning.data.webdataset import WebDatasetSource


def _png(path: Path, size=(8, 6), colour="red") -> None:
    Image.new("RGB", size, colour).save(path)


def _line(**row) -> bytes:
    return (json.dumps(row) + "\n").encode()


def test_a_line_that_is_not_utf8_is_a_bad_record_and_the_others_are_read(tmp_path):
    _png(tmp_path / "a.png")
    data = _line(id="a", image="a.png", text="a red circle") + b'{"id": "b", "image": "a.png", "text": "caf\xe9"}\n' \
        + _line(id="c", image="a.png", text="a blue square")
    (tmp_path / "m.jsonl").write_bytes(data)
    records, failures = read_pairs(tmp_path / "m.jsonl")
    assert [r.id for r in records] == ["a", "c"]
    assert len(failures) == 1 and failures[0].id == "line 2" and "not valid UTF-8 (byte 0xe9" in failures[0].reason


def test_a_csv_record_that_is_not_utf8_is_a_bad_record(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes(b"id,image,text\na,a.png,a red circle\nb,a.png,caf\xe9\n"
                                     b'c,a.png,"two\nlines"\n')
    records, failures = read_pairs(tmp_path / "m.csv")
    assert [(r.id, r.text) for r in records] == [("a", "a red circle"), ("c", "two\nlines")]
    assert [(f.id, f.reason) for f in failures] == [("b", "line 3: not valid UTF-8")]


def test_a_whitespace_only_id_is_a_missing_id(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_bytes(_line(id="   ", image="a.png", text="x") + _line(id="\t", image="a.png", text="y"))
    records, failures = read_pairs(tmp_path / "m.jsonl")
    assert records == [] and [f.reason for f in failures] == ["line 1: missing id", "line 2: missing id"]
    assert all(f.id.startswith("line ") for f in failures)


def test_copies_of_an_id_reach_one_reader_which_reports_each_later_copy_once(tmp_path):
    _png(tmp_path / "a.png")
    rows = [_line(id=f"p{i}", image="a.png", text="x") for i in range(12)] + [_line(id="p3", image="a.png", text="x")] * 2
    (tmp_path / "m.jsonl").write_bytes(b"".join(rows))
    source = ManifestSource(tmp_path / "m.jsonl")
    shares = [list(source.split(slot, 4)) for slot in range(4)]
    duplicates = [e for share in shares for e in share if isinstance(e, Failure)]
    assert [(d.id, d.reason) for d in duplicates] == [("p3", "line 13: duplicate id (first at line 4)"),
                                                     ("p3", "line 14: duplicate id (first at line 4)")]
    holder = owner_slot("p3", 4)
    assert all(isinstance(e, Failure) is False for slot, share in enumerate(shares) if slot != holder for e in share)
    assert sorted(e.id for share in shares for e in share if not isinstance(e, Failure)) == sorted(f"p{i}" for i in range(12))


def test_exif_orientation_is_applied_and_recorded_in_the_geometry(tmp_path, tiny_bundle):
    from m2ib_lightning.backbones import load_backbone

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = load_rgb(tmp_path / "phone.jpg")
    assert upright.size == (20, 40) and upright.info[EXIF_ORIENTATION] == 6  # (width, height): now portrait
    array = np.asarray(upright)
    assert array[:8].mean() > 200 and array[-8:].mean() < 50  # the band is now at the top
    geometry = load_backbone(str(tiny_bundle)).image_geometry(upright)
    assert geometry.original == (40, 20) and geometry.exif_orientation == 6
    _png(tmp_path / "plain.png")
    assert load_rgb(tmp_path / "plain.png").info[EXIF_ORIENTATION] == 1


def test_image_and_mask_paths_outside_data_root_are_bad_records(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "ok.png")
    _png(tmp_path / "outside.png")
    rows = [_line(id="ok", image="ok.png", text="x"), _line(id="up", image="../outside.png", text="x"),
            _line(id="abs", image="/etc/passwd", text="x"), _line(id="mask", image="ok.png", text="x", mask="../outside.png"),
            _line(id="inside-abs", image=str(data / "ok.png"), text="x")]
    (data / "m.jsonl").write_bytes(b"".join(rows))
    records, failures = read_pairs(data / "m.jsonl")
    assert [r.id for r in records] == ["ok", "inside-abs"]
    reasons = {f.id: f.reason for f in failures}
    assert set(reasons) == {"up", "abs", "mask"}
    assert "image path '../outside.png' lies outside data.root=" in reasons["up"]
    assert "image path '/etc/passwd' lies outside" in reasons["abs"] and "mask path" in reasons["mask"]
    records, failures = read_pairs(data / "m.jsonl", root=tmp_path)  # a wider root lets the sibling folder in
    assert {r.id for r in records} == {"ok", "up", "mask", "inside-abs"} and [f.id for f in failures] == ["abs"]


def test_a_missing_data_root_is_a_config_error_naming_it(tmp_path):
    from m2ib_lightning.config import ConfigError
    from m2ib_lightning.tasks.common import source_of

    (tmp_path / "m.jsonl").write_bytes(b"")
    cfg = load_config(None, [f"data.manifest={tmp_path / 'm.jsonl'}", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="data.root"):
        source_of(cfg)


def _png_bytes(colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_ids_are_unique_across_shards_and_a_key_repeated_in_a_tar_is_reported(tmp_path):
    write_tar(tmp_path / "a.tar", {"k1.png": _png_bytes(), "k1.txt": b"one", "k2.png": _png_bytes(), "k2.txt": b"two",
                              "other.png": _png_bytes(), "other.txt": b"x", "k1.jpg": _png_bytes()})
    write_tar(tmp_path / "b.tar", {"k1.png": _png_bytes("blue"), "k1.txt": b"three"})
    entries = list(WebDatasetSource(str(tmp_path / "{a,b}.tar")).split(0, 1))
    good = [e.id for e in entries if not isinstance(e, Failure)]
    assert good == ["a/k1", "a/k2", "a/other", "b/k1"]
    duplicates = [e for e in entries if isinstance(e, Failure)]
    assert [d.id for d in duplicates] == ["a/k1"] and "duplicate id 'a/k1'" in duplicates[0].reason

    bare = list(WebDatasetSource(str(tmp_path / "{a,b}.tar"), bare_keys=True).split(0, 1))
    assert [e.id for e in bare if not isinstance(e, Failure)] == ["k1", "k2", "other"]
    assert [e.id for e in bare if isinstance(e, Failure)] == ["k1", "k1"]  # again in a.tar, then in b.tar


def test_webdataset_shards_whose_names_collide_are_refused(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_tar(tmp_path / folder / "00000.tar", {"k.png": _png_bytes(), "k.txt": b"x"})
    with pytest.raises(ValueError, match="share the name '00000'"):
        WebDatasetSource(str(tmp_path / "{x,y}/00000.tar"))


def test_a_ranks_share_of_the_done_ids_is_what_its_readers_can_meet(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_bytes(b"".join(_line(id=f"p{i}", image="a.png", text="x") for i in range(40)))
    source = ManifestSource(tmp_path / "m.jsonl")
    world, workers = 2, 3
    for rank in range(world):
        met = {e.id for w in range(workers) for e in source.split(rank * workers + w, world * workers)}
        share = ManifestSource.rank_share(rank, world, workers)
        assert met == {f"p{i}" for i in range(40) if share(f"p{i}")} and met


def test_batches_hold_one_picture_size_in_stream_order_with_failures_riding_along_and_few_sizes_open():
    import torch

    from m2ib_lightning.data.attribution import same_size_batches

    def item(name: str, h: int, w: int) -> dict:
        return {"id": name, "picture": torch.zeros(3, h, w)}

    stream = [item("a1", 8, 16), item("b1", 16, 8), {"id": "bad", "failure": "unreadable"}, item("a2", 8, 16),
              item("b2", 16, 8), item("a3", 8, 16), item("c1", 8, 8)]
    batches = [[i["id"] for i in batch] for batch in same_size_batches(iter(stream), 2)]
    assert batches == [["bad", "a1", "a2"], ["b1", "b2"], ["a3"], ["c1"]]  # every item once; full batches first
    # past max_open sizes held part-filled, the oldest goes out short: memory stays bounded
    many = [item(f"s{n}", 8, 8 * (n + 1)) for n in range(5)]
    assert [[i["id"] for i in b] for b in same_size_batches(iter(many), 4, max_open=2)] == [["s0"], ["s1"], ["s2"], ["s3"], ["s4"]]
    assert [len(b) for b in same_size_batches(iter([item(str(n), 8, 8) for n in range(5)]), 2)] == [2, 2, 1]
    assert list(same_size_batches(iter([{"id": "x", "failure": "gone"}]), 2)) == [[{"id": "x", "failure": "gone"}]]
    with pytest.raises(ValueError, match="batch_size"):
        next(same_size_batches(iter(stream), 0))
