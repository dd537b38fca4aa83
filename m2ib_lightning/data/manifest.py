"""Reading image-text pairs from a manifest, COCO captions or a folder, and loading images defensively.

A bad record never stops a run: what shows in the manifest itself (missing
fields, empty caption, duplicate id) comes out of :class:`ManifestSource` as a
:class:`Failure`; what shows only when loading (missing, corrupt, truncated,
zero-size images) is reported by :func:`load_rgb` raising :class:`BadImage`
in the data loader. Nothing is read or stat-ed before it is needed.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from .records import BadImage, Failure, PairRecord, by_position

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CAPTIONS_FILE = "captions.txt"  # in a folder: one "FILE_NAME<TAB>CAPTION" per line


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited on white, palettes expanded, 16-bit and float rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / high * 255.0, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_rgb(source: Path | bytes, name: str | None = None) -> Image.Image:
    """Open (a file, or the bytes of one), fully decode and convert to RGB; raise :class:`BadImage` with a reason otherwise."""
    if isinstance(source, (bytes, bytearray)):
        name, opened = name or "image", io.BytesIO(source)
    else:
        name, opened = name or Path(source).name, source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as image:
                image.load()  # decode now: a truncated file fails here, not later
                if image.width == 0 or image.height == 0:
                    raise BadImage(f"zero-size image ({image.width}x{image.height}): {name}")
                return to_rgb(image)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(f"image not found: {source}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not a readable image file: {name}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"corrupt or truncated image {name}: {err}") from None


def _rows(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, row, parse error) per record of a JSONL, CSV or COCO captions file; JSONL and CSV are streamed."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {number}", None, f"invalid JSON: {err.msg}"
                    continue
                yield f"line {number}", row if isinstance(row, dict) else None, None if isinstance(row, dict) else "not a JSON object"
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for number, row in enumerate(csv.DictReader(handle), 2):
                yield f"line {number}", row, None
    elif suffix == ".json":
        coco = json.loads(path.read_text(encoding="utf-8-sig"))
        files = {image["id"]: image.get("file_name") for image in coco["images"]}
        for a in coco["annotations"]:
            yield f"annotation {a.get('id')}", {"id": a.get("id"), "image": files.get(a.get("image_id")), "text": a.get("caption")}, None
    else:  # a folder
        with open(path / CAPTIONS_FILE, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    name, _, text = line.rstrip("\n").partition("\t")
                    yield f"line {number}", {"id": Path(name).stem, "image": name, "text": text}, None


class ManifestSource:
    """The pairs of a manifest (JSONL/CSV with id, image, text), COCO captions JSON, or a folder with captions.txt.

    Checked when made (exists, known format, CSV columns); read lazily, line by line,
    each time it is iterated. Image paths are relative to the manifest's folder and
    are not touched until the image is loaded. Records that are bad on their face
    (missing fields, empty caption, duplicate id) come out as :class:`Failure`.
    """

    def __init__(self, source: str | Path):
        self.path = Path(source)
        if not self.path.exists():
            raise FileNotFoundError(f"data.manifest={str(self.path)!r} does not exist")
        self.root = self.path if self.path.is_dir() else self.path.parent
        suffix = self.path.suffix.lower()
        if self.path.is_dir():
            if not (self.path / CAPTIONS_FILE).is_file():
                raise ValueError(f"folder {self.path} has no {CAPTIONS_FILE} (one 'FILE_NAME<TAB>CAPTION' per line)")
        elif suffix == ".csv":
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                missing = {"id", "image", "text"} - set(csv.DictReader(handle).fieldnames or ())
            if missing:
                raise ValueError(f"manifest {self.path} lacks the columns {sorted(missing)} (needs id, image, text)")
        elif suffix == ".json":
            try:
                coco = json.loads(self.path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path} is not valid JSON: {err.msg}") from None
            if not isinstance(coco, dict) or "annotations" not in coco or "images" not in coco:
                raise ValueError(f"{self.path} is not COCO captions JSON (needs 'images' and 'annotations')")
        elif suffix != ".jsonl":
            raise ValueError(f"manifest {self.path} must be .jsonl, .csv, COCO .json, or a folder with {CAPTIONS_FILE}")

    def size_hint(self) -> int | None:
        """Records in the manifest, counted from its lines without parsing them (for the progress bar)."""
        if self.path.suffix.lower() == ".json":
            return None
        path = self.path / CAPTIONS_FILE if self.path.is_dir() else self.path
        with open(path, "rb") as handle:
            lines = sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
        return max(lines - (self.path.suffix.lower() == ".csv"), 0)

    def split(self, slot: int, slots: int, skip: set[str] | frozenset = frozenset()) -> Iterator[PairRecord | Failure]:
        """This rank's and worker's share of the records (see :func:`by_position`)."""
        return by_position(self, slot, slots, skip)

    def __iter__(self) -> Iterator[PairRecord | Failure]:
        seen: dict[str, str] = {}
        for where, row, error in _rows(self.path):
            raw_id = None if row is None else row.get("id")
            sample_id = str(raw_id).strip() if raw_id not in (None, "") else where
            if error:
                yield Failure(sample_id, f"{where}: {error}")
                continue
            image, text = row.get("image"), row.get("text")
            if raw_id in (None, ""):
                yield Failure(sample_id, f"{where}: missing id")
            elif sample_id in seen:
                yield Failure(sample_id, f"{where}: duplicate id (first at {seen[sample_id]})")
            elif not isinstance(text, str) or not text.strip():
                yield Failure(sample_id, f"{where}: empty caption")
            elif not isinstance(image, str) or not image.strip():
                yield Failure(sample_id, f"{where}: missing image path")
            else:
                truth = _ground_truth(row, self.root, self.root / image)
                if isinstance(truth, str):
                    yield Failure(sample_id, f"{where}: {truth}")
                else:
                    yield PairRecord(sample_id, text.strip(), partial(load_rgb, self.root / image), load_mask=truth)
            seen.setdefault(sample_id, where)


def _ground_truth(row: dict, root: Path, image: Path) -> Callable[[], np.ndarray] | None | str:
    """A row's optional ground truth for localisation: ``mask`` (an image file, non-zero = inside) or ``boxes``
    ([[x0, y0, x1, y1], ...] in the original image's pixels). A loader, None, or the reason it is unusable."""
    if row.get("mask"):
        return partial(_mask_file, root / str(row["mask"]))
    boxes = row.get("boxes")
    if boxes in (None, ""):
        return None
    if isinstance(boxes, str):
        try:
            boxes = json.loads(boxes)
        except json.JSONDecodeError:
            return "boxes is not a JSON list of [x0, y0, x1, y1]"
    if not isinstance(boxes, list) or not boxes or not all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) for b in boxes
    ):
        return "boxes must be a non-empty list of [x0, y0, x1, y1]"
    return partial(_box_mask, image, [tuple(b) for b in boxes])


def _mask_file(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as mask:
            return np.asarray(mask.convert("L")) > 0
    except (OSError, ValueError) as err:
        raise BadImage(f"mask {path.name} cannot be read: {err}") from None


def _box_mask(image: Path, boxes: list[tuple[float, ...]]) -> np.ndarray:
    with Image.open(image) as opened:
        width, height = opened.size
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(int(y0), 0): max(int(np.ceil(y1)), 0), max(int(x0), 0): max(int(np.ceil(x1)), 0)] = True
    return mask


def read_pairs(source: str | Path) -> tuple[list[PairRecord], list[Failure]]:
    """All records of a manifest at once (see :class:`ManifestSource`): the good ones, and one Failure per bad one."""
    records, failures = [], []
    for entry in ManifestSource(source):
        (failures if isinstance(entry, Failure) else records).append(entry)
    return records, failures
