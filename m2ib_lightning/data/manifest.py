"""Reading image-text pairs from a manifest, COCO captions or a folder, and loading images defensively.

A bad record never stops a run: what can be checked up front (missing fields,
empty caption, duplicate id, missing file) is reported by :func:`read_pairs`;
what shows only when decoding (corrupt, truncated, zero-size images) is
reported by :func:`load_rgb` raising :class:`BadImage` in the data loader.
"""

from __future__ import annotations

import csv
import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .records import BadImage, Failure, PairRecord

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


def load_rgb(path: Path) -> Image.Image:
    """Open, fully decode and convert to RGB; raise :class:`BadImage` with a reason otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not later
                if image.width == 0 or image.height == 0:
                    raise BadImage(f"zero-size image ({image.width}x{image.height}): {path.name}")
                return to_rgb(image)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not a readable image file: {path.name}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"corrupt or truncated image {path.name}: {err}") from None


def _rows(path: Path) -> list[tuple[str, dict | None, str | None]]:
    """(where, row, parse error) per record of a JSONL, CSV or COCO captions file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((f"line {number}", row if isinstance(row, dict) else None, None if isinstance(row, dict) else "not a JSON object"))
            except json.JSONDecodeError as err:
                rows.append((f"line {number}", None, f"invalid JSON: {err.msg}"))
        return rows
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = {"id", "image", "text"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"manifest {path} lacks the columns {sorted(missing)} (needs id, image, text)")
            return [(f"line {number}", row, None) for number, row in enumerate(reader, 2)]
    if suffix == ".json":
        coco = json.loads(path.read_text(encoding="utf-8-sig"))
        if not isinstance(coco, dict) or "annotations" not in coco or "images" not in coco:
            raise ValueError(f"{path} is not COCO captions JSON (needs 'images' and 'annotations')")
        files = {image["id"]: image.get("file_name") for image in coco["images"]}
        return [
            (f"annotation {a.get('id')}", {"id": a.get("id"), "image": files.get(a.get("image_id")), "text": a.get("caption")}, None)
            for a in coco["annotations"]
        ]
    raise ValueError(f"manifest {path} must be .jsonl, .csv, COCO .json, or a folder with {CAPTIONS_FILE}")


def _folder_rows(folder: Path) -> list[tuple[str, dict | None, str | None]]:
    captions = folder / CAPTIONS_FILE
    if not captions.is_file():
        raise ValueError(f"folder {folder} has no {CAPTIONS_FILE} (one 'FILE_NAME<TAB>CAPTION' per line)")
    rows = []
    for number, line in enumerate(captions.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        name, _, text = line.partition("\t")
        rows.append((f"line {number}", {"id": Path(name).stem, "image": name, "text": text}, None))
    return rows


def read_pairs(source: str | Path) -> tuple[list[PairRecord], list[Failure]]:
    """Records of a manifest (JSONL/CSV with id, image, text), COCO captions JSON, or a folder with captions.

    Image paths are relative to the manifest's folder. Returns the good
    records and one :class:`Failure` per record skipped up front.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"data.manifest={str(source)!r} does not exist")
    rows = _folder_rows(source) if source.is_dir() else _rows(source)
    root = source if source.is_dir() else source.parent
    records, failures, seen = [], [], {}
    for where, row, error in rows:
        raw_id = None if row is None else row.get("id")
        sample_id = str(raw_id).strip() if raw_id not in (None, "") else where
        if error:
            failures.append(Failure(sample_id, f"{where}: {error}"))
            continue
        image, text = row.get("image"), row.get("text")
        if raw_id in (None, ""):
            failures.append(Failure(sample_id, f"{where}: missing id"))
        elif sample_id in seen:
            failures.append(Failure(sample_id, f"{where}: duplicate id (first at {seen[sample_id]})"))
        elif not isinstance(text, str) or not text.strip():
            failures.append(Failure(sample_id, f"{where}: empty caption"))
        elif not isinstance(image, str) or not image.strip():
            failures.append(Failure(sample_id, f"{where}: missing image path"))
        elif not (root / image).is_file():
            failures.append(Failure(sample_id, f"{where}: image not found: {image}"))
        else:
            records.append(PairRecord(sample_id, text.strip(), partial(load_rgb, root / image)))
        seen.setdefault(sample_id, where)
    return records, failures
