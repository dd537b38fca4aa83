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
import os
import warnings
import zlib
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


EXIF_ORIENTATION = "exif_orientation"  # key in a loaded image's ``info``: the EXIF orientation applied to it (1: none)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1)) or 1
    except (ValueError, TypeError, OSError):
        return 1


def load_rgb(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Open (a file, or the bytes of one), fully decode, turn upright by its EXIF orientation (as viewers show it)
    and convert to RGB; raise :class:`BadImage` with a reason otherwise."""
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
                orientation = _orientation(image)
                upright = to_rgb(ImageOps.exif_transpose(image) if orientation != 1 else image)
                upright.info[EXIF_ORIENTATION] = orientation
                return upright
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(f"image not found: {source}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not a readable image file: {name}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"corrupt or truncated image {name}: {err}") from None


_BOM = b"\xef\xbb\xbf"


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, decoding error) per line of a file read as bytes: a line that is not valid UTF-8 is
    a bad record of its own, never the end of the run. A UTF-8 byte-order mark is dropped."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                yield number, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"


def _undecodable(row: dict) -> bool:
    """Whether a CSV row read with ``surrogateescape`` holds bytes that are not UTF-8."""
    return any(isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v) for v in row.values())


def _rows(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, row, parse error) per record of a JSONL, CSV or COCO captions file; JSONL and CSV are streamed."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line, error in _decoded_lines(path):
            if error:
                yield f"line {number}", None, error
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield f"line {number}", None, f"invalid JSON: {err.msg}"
                continue
            yield f"line {number}", row if isinstance(row, dict) else None, None if isinstance(row, dict) else "not a JSON object"
    elif suffix == ".csv":  # records may span lines (quoted newlines): bytes that are not UTF-8 are caught per record
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                where = f"line {reader.line_num}"
                if _undecodable(row):  # the id still names the record where it decodes
                    yield where, {"id": row.get("id")} if not _undecodable({"id": row.get("id")}) else None, "not valid UTF-8"
                else:
                    yield where, row, None
    elif suffix == ".json":
        coco = json.loads(path.read_text(encoding="utf-8-sig"))
        files = {image["id"]: image.get("file_name") for image in coco["images"]}
        for a in coco["annotations"]:
            yield f"annotation {a.get('id')}", {"id": a.get("id"), "image": files.get(a.get("image_id")), "text": a.get("caption")}, None
    else:  # a folder
        for number, line, error in _decoded_lines(path / CAPTIONS_FILE):
            if error:
                yield f"line {number}", None, error
            elif line.strip():
                name, _, text = line.rstrip("\r\n").partition("\t")
                yield f"line {number}", {"id": Path(name).stem, "image": name, "text": text}, None


def owner_slot(key: str, slots: int) -> int:
    """The reader (rank x loader worker) a record belongs to, from a stable hash of its id: every copy of an id
    reaches the same reader, which alone checks it for duplicates."""
    return zlib.crc32(key.encode("utf-8", errors="surrogatepass")) % slots


class ManifestSource:
    """The pairs of a manifest (JSONL/CSV with id, image, text), COCO captions JSON, or a folder with captions.txt.

    Checked when made (exists, known format, CSV columns); read lazily, line by line,
    each time it is iterated. Image paths are relative to the manifest's folder and
    are not touched until the image is loaded; every path (relative or absolute) must
    lie inside ``root`` (default: the manifest's folder), others are bad records.
    Records that are bad on their face (missing fields, empty caption, duplicate id,
    bytes that are not UTF-8, a path outside ``root``) come out as :class:`Failure`.

    Each reader keeps the records whose id hashes to it (:func:`owner_slot`), so it holds
    and checks for duplicates only its own share of the ids.
    """

    def __init__(self, source: str | Path, root: str | Path | None = None, *, questions: bool = False):
        self.questions = questions  # records are (id, image, question, answer?) instead of (id, image, text)
        self.text_field = "question" if questions else "text"
        self.path = Path(source)
        if not self.path.exists():
            raise FileNotFoundError(f"data.manifest={str(self.path)!r} does not exist")
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.root = Path(os.path.abspath(root if root is not None else self.folder))
        self._folder, self._root = str(self.folder), str(self.root)
        self._root_prefix = self._root if self._root.endswith(os.sep) else self._root + os.sep
        if root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} is not a directory")
        suffix = self.path.suffix.lower()
        if questions and (self.path.is_dir() or suffix not in (".jsonl", ".csv")):
            raise ValueError(f"questions come from a .jsonl or .csv manifest (id, image, question, answer?), got {self.path}")
        if self.path.is_dir():
            if not (self.path / CAPTIONS_FILE).is_file():
                raise ValueError(f"folder {self.path} has no {CAPTIONS_FILE} (one 'FILE_NAME<TAB>CAPTION' per line)")
        elif suffix == ".csv":
            with open(self.path, newline="", encoding="utf-8-sig", errors="replace") as handle:
                missing = {"id", "image", self.text_field} - set(csv.DictReader(handle).fieldnames or ())
            if missing:
                raise ValueError(f"manifest {self.path} lacks the columns {sorted(missing)} (needs id, image, {self.text_field})")
        elif suffix == ".json":
            try:
                coco = json.loads(self.path.read_text(encoding="utf-8-sig"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{self.path} is not valid UTF-8 (at byte {err.start})") from None
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
        """This reader's records (ids hashing to ``slot`` of ``slots``) in manifest order, minus those done."""
        return self._entries(slot, slots, skip)

    def __iter__(self) -> Iterator[PairRecord | Failure]:
        return self._entries(0, 1, frozenset())

    @staticmethod
    def rank_share(rank: int, world_size: int, workers: int) -> Callable[[str], bool]:
        """Whether an id belongs to one of ``rank``'s readers (slots ``rank * workers + w`` of ``world_size * workers``):
        a resumed rank needs only those of the done ids."""
        slots = world_size * workers
        return lambda sample_id: owner_slot(sample_id, slots) // workers == rank

    def inside_root(self, relative: str) -> str | None:
        """The path of a manifest's image or mask (relative to the manifest's folder, or absolute), or None if it
        lies outside ``root`` (checked on the path as written, ``..`` resolved; symbolic links are followed later).
        String operations: this runs once per record of manifests of millions of lines."""
        path = os.path.abspath(os.path.join(self._folder, relative))
        return path if path == self._root or path.startswith(self._root_prefix) else None

    def _entries(self, slot: int, slots: int, skip: set[str] | frozenset) -> Iterator[PairRecord | Failure]:
        seen: dict[str, str] = {}
        for where, row, error in _rows(self.path):
            raw_id = None if row is None else row.get("id")
            given = "" if raw_id is None else str(raw_id).strip()
            sample_id = given or where
            if owner_slot(sample_id, slots) != slot:
                continue
            if error:
                yield Failure(sample_id, f"{where}: {error}")
                continue
            if not given:
                yield Failure(sample_id, f"{where}: missing id")
                continue
            if sample_id in seen:
                yield Failure(sample_id, f"{where}: duplicate id (first at {seen[sample_id]})")
                continue
            seen[sample_id] = where
            if sample_id in skip:
                continue
            yield self._record(sample_id, where, row)

    def _record(self, sample_id: str, where: str, row: dict) -> PairRecord | Failure:
        image, text = row.get("image"), row.get(self.text_field)
        if not isinstance(text, str) or not text.strip():
            return Failure(sample_id, f"{where}: empty {'question' if self.questions else 'caption'}")
        answer = row.get("answer") if self.questions else None
        answer = None if answer == "" else answer  # an empty CSV cell: the model's own answer
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
            return Failure(sample_id, f"{where}: answer must be a non-empty string, got {answer!r}")
        if not isinstance(image, str) or not image.strip():
            return Failure(sample_id, f"{where}: missing image path")
        image_path = self.inside_root(image)
        if image_path is None:
            return Failure(sample_id, f"{where}: image path {image!r} lies outside data.root={str(self.root)!r} "
                                      "(set data.root to the folder that holds the images)")
        truth = _ground_truth(row, self, image_path)
        if isinstance(truth, str):
            return Failure(sample_id, f"{where}: {truth}")
        label = None if row.get("class") == "" else row.get("class")  # an empty CSV cell: no class
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip()):
            return Failure(sample_id, f"{where}: class must be a non-empty string, got {label!r}")
        return PairRecord(sample_id, text.strip(), partial(load_rgb, image_path), load_mask=truth,
                          target_class=None if label is None else str(label).strip(),
                          answer=None if answer is None else answer.strip())


def _ground_truth(row: dict, source: ManifestSource, image: str) -> Callable[[], np.ndarray] | None | str:
    """A row's optional ground truth for localisation: ``mask`` (an image file, non-zero = inside) or ``boxes``
    ([[x0, y0, x1, y1], ...] in the original image's pixels). A loader, None, or the reason it is unusable."""
    if row.get("mask"):
        mask = source.inside_root(str(row["mask"]))
        return f"mask path {row['mask']!r} lies outside data.root={str(source.root)!r}" if mask is None else partial(_mask_file, mask)
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


def _mask_file(path: str) -> np.ndarray:
    try:
        with Image.open(path) as mask:
            return np.asarray(mask.convert("L")) > 0
    except (OSError, ValueError) as err:
        raise BadImage(f"mask {Path(path).name} cannot be read: {err}") from None


def _box_mask(image: str, boxes: list[tuple[float, ...]]) -> np.ndarray:
    with Image.open(image) as opened:  # boxes are given on the picture as shown: EXIF orientation applied
        width, height = ImageOps.exif_transpose(opened).size if _orientation(opened) != 1 else opened.size
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(int(y0), 0): max(int(np.ceil(y1)), 0), max(int(x0), 0): max(int(np.ceil(x1)), 0)] = True
    return mask


def read_pairs(source: str | Path, root: str | Path | None = None) -> tuple[list[PairRecord], list[Failure]]:
    """All records of a manifest at once (see :class:`ManifestSource`): the good ones, and one Failure per bad one."""
    records, failures = [], []
    for entry in ManifestSource(source, root):
        (failures if isinstance(entry, Failure) else records).append(entry)
    return records, failures
