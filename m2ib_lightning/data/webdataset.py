"""Image-text pairs from WebDataset tar shards, as img2dataset writes them.

Each sample is a group of tar members sharing a key: an image (``key.jpg``,
``.jpeg``, ``.png`` or ``.webp``) and a caption (``key.txt``, or ``key.json``
with a ``caption`` field). The sample id is ``SHARD/KEY`` (the tar's file name without
``.tar``, then the key): img2dataset restarts its keys in every shard, so a bare key
is unique only within its tar (``bare_keys=True`` uses the key alone, for datasets
whose keys are unique across shards; a repeated key is then reported by the reader
that meets it again). A key repeated within one tar is reported. Shards are split across
ranks and loader workers (whole shards while there are at least as many shards
as readers, else every reader reads every shard and keeps its share of the
samples). A sample without an image or a caption, an image that does not
decode, and a tar that cannot be read are reported and skipped.

For VQA runs (``questions=True``) a sample's ``key.json`` holds its ``question`` and, optionally, the ``answer``
to explain (without one, the model's own greedy answer is explained).
"""

from __future__ import annotations

import json
import tarfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from .manifest import load_rgb
from .records import Failure, PairRecord, by_position

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _require_webdataset():
    try:
        import webdataset
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("data.webdataset needs the `webdataset` package: pip install webdataset") from err
    return webdataset


class WebDatasetSource:
    """The pairs of a brace pattern of tar shards, e.g. ``/data/{00000..00999}.tar``."""

    def __init__(self, urls: str, bare_keys: bool = False, *, questions: bool = False):
        wds = _require_webdataset()
        self.pattern, self.bare_keys, self.questions = urls, bare_keys, questions
        self.urls = list(wds.shardlists.expand_urls(urls))
        if not self.urls:
            raise ValueError(f"data.webdataset={urls!r} names no shard")
        stems: dict[str, str] = {}
        for url in self.urls:
            first = stems.setdefault(shard_stem(url), url)
            if first != url and not bare_keys:
                raise ValueError(f"data.webdataset={urls!r}: shards {first} and {url} share the name {shard_stem(url)!r}, "
                                 "which sample ids start with; rename one")
        local = [u for u in self.urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not Path(u).is_file()]
        if local and len(missing) == len(local):
            raise FileNotFoundError(f"data.webdataset={urls!r}: no shard exists (first: {missing[0]})")

    def size_hint(self) -> int | None:
        """Samples in all shards, from img2dataset's ``NNNNN_stats.json`` files where every shard has one."""
        total = 0
        for url in self.urls:
            stats = Path(url).with_name(Path(url).stem + "_stats.json")
            try:
                total += int(json.loads(stats.read_text())["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return total

    def split(self, slot: int, slots: int, skip: set[str] | frozenset = frozenset()) -> Iterator[PairRecord | Failure]:
        if len(self.urls) >= slots:
            yield from self._samples(self.urls[slot::slots], skip)
        else:
            yield from by_position(self._samples(self.urls, frozenset()), slot, slots, skip)

    def sample_id(self, url: str, key: str) -> str:
        return key if self.bare_keys else f"{shard_stem(url)}/{key}"

    def _samples(self, urls: list[str], skip: set[str] | frozenset) -> Iterator[PairRecord | Failure]:
        wds = _require_webdataset()
        seen_across: set[str] = set()  # bare keys: every id this reader met, to report one met again
        for url in urls:
            if skip and _all_done(url, skip, partial(self.sample_id, url)):
                continue  # a rerun passes over finished shards reading their headers only
            errors: list[Exception] = []
            seen = seen_across if self.bare_keys else set()

            def keep_going(err: Exception) -> bool:
                errors.append(err)
                return False  # stop reading this tar: what follows a broken member cannot be trusted

            for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=keep_going):
                key = sample.get("__key__")
                if key is None:
                    continue
                sample_id = self.sample_id(url, key)
                if sample_id in seen:
                    yield Failure(sample_id, f"{Path(url).name}:{key}: duplicate id {sample_id!r} (its key repeats"
                                             f"{'' if self.bare_keys else ' within this tar'}); this copy is skipped")
                    continue
                seen.add(sample_id)
                if sample_id not in skip:
                    yield self._record(sample, sample_id, url)
            for err in errors:
                yield Failure(url, f"shard {Path(url).name}: unreadable tar ({type(err).__name__}: {err}); its later samples are skipped")

    def _record(self, sample: dict[str, Any], sample_id: str, url: str) -> PairRecord | Failure:
        where = f"{Path(url).name}:{sample['__key__']}"
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image is None:
            return Failure(sample_id, f"{where}: no image member (key.jpg, .jpeg, .png or .webp)")
        if self.questions:
            return _question_record(sample, sample_id, where, image)
        text = None
        if "txt" in sample:
            text = sample["txt"].decode("utf-8", errors="replace")
        elif "json" in sample:
            try:
                text = json.loads(sample["json"]).get("caption")
            except (ValueError, AttributeError):
                return Failure(sample_id, f"{where}: key.json is not a JSON object")
        if not isinstance(text, str) or not text.strip():
            return Failure(sample_id, f"{where}: no caption (key.txt, or key.json with a caption)")
        return PairRecord(sample_id, text.strip(), partial(load_rgb, bytes(image), where))


def _question_record(sample: dict[str, Any], sample_id: str, where: str, image: bytes) -> PairRecord | Failure:
    """A question (and perhaps its answer) from the sample's ``key.json``."""
    try:
        fields = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        return Failure(sample_id, f"{where}: no key.json object with a question")
    question, answer = fields.get("question"), fields.get("answer")
    if not isinstance(question, str) or not question.strip():
        return Failure(sample_id, f"{where}: key.json has no question (a non-empty string)")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        return Failure(sample_id, f"{where}: key.json's answer must be a non-empty string, got {answer!r}")
    return PairRecord(sample_id, question.strip(), partial(load_rgb, bytes(image), where),
                      answer=None if answer is None else answer.strip())


def shard_stem(url: str) -> str:
    """A shard's name in sample ids: its file name without ``.tar`` (and ``.gz``)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name


def _all_done(url: str, skip: set[str] | frozenset, sample_id: Callable[[str], str]) -> bool:
    """Whether every sample key of a local tar is done, from its member headers (seeking past the data)."""
    if "://" in url or url.startswith("pipe:") or not Path(url).is_file():
        return False
    try:
        with tarfile.open(url, "r:") as tar:  # random access: headers only
            names = [m.name for m in tar.getmembers() if m.isreg() and not m.name.startswith("__")]
    except (tarfile.TarError, OSError):
        return False  # read it the normal way, which reports what is wrong
    base_plus_ext = _require_webdataset().tariterators.base_plus_ext  # the keys webdataset itself gives
    keys = {base_plus_ext(name)[0] for name in names}
    return bool(keys) and None not in keys and {sample_id(key) for key in keys} <= skip
