"""Minimal pairs for probing: a clean input and a corrupted one that differ in exactly one concept.

- Image pairs from the shapes world (:func:`vqa_minimal_pair`): the same scene with one attribute of
  the object the question asks about changed, so that the answer flips to the other option.
- Text STR (:func:`symmetric_token_replacement`): words replaced by others of the same role with the
  same token count under the model's tokenizer, or a clear error when none fits.
- Pairs from a manifest (:func:`read_vqa_pairs`): ``clean_image``, ``corrupt_image``, ``question``,
  ``answer``, ``wrong_answer``; a bad record is skipped and listed.
- Gaussian noise (:func:`gaussian_noise`): only as a labelled baseline, never the default.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch import Tensor

from ..shapes.questions import TWO_CHOICE_KINDS, Question, ShapesVQA
from ..data.records import Failure
from ..shapes.world import SIZES, Scene, _free, _relation_holds, render


@dataclass
class VQAPair:
    """One probing pair: the answers are the clean input's (correct) and the corrupted input's (incorrect)."""

    id: str
    question: str
    answer: str
    wrong: str
    kind: str
    roles: tuple[str, ...]  # one per word of the question
    clean_image: Callable[[], Image.Image]
    corrupt_image: Callable[[], Image.Image]
    corrupt_question: str | None = None  # set for text corruption


def _changed(scene: Scene, question: Question, rng: random.Random) -> Scene | None:
    """The scene with the asked-about attribute of the target object set to the wrong option."""
    obj = scene.objects[question.target]
    others = [o.box for i, o in enumerate(scene.objects) if i != question.target]
    if question.kind == "colour":
        new = replace(obj, colour=question.wrong)
    elif question.kind == "shape":
        new = replace(obj, shape=question.wrong)
    elif question.kind == "size":
        cx, cy = obj.centre
        for _ in range(50):
            side = int(round(rng.uniform(*SIZES[question.wrong]) * scene.size))
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            box = (x0, y0, x0 + side, y0 + side)
            if x0 >= 1 and y0 >= 1 and box[2] <= scene.size - 2 and box[3] <= scene.size - 2 and _free(box, others):
                break
        else:
            return None
        new = replace(obj, size=question.wrong, box=box)
    elif question.kind in ("side", "place"):
        return _moved(scene, question, rng)
    else:
        raise ValueError(f"no image corruption for {question.kind!r} questions; use one of {TWO_CHOICE_KINDS}")
    objects = list(scene.objects)
    objects[question.target] = new
    return replace(scene, objects=tuple(objects))


def _moved(scene: Scene, question: Question, rng: random.Random) -> Scene | None:
    """One object moved (the same height first, then anywhere) until the other option is true: the asked-about
    object, or for a side question whose target cannot move there, the object it is compared with."""
    movers = [question.target] + ([question.other] if question.kind == "side" else [])
    for mover in movers:
        obj = scene.objects[mover]
        others = [o.box for i, o in enumerate(scene.objects) if i != mover]
        side = obj.box[2] - obj.box[0]
        places = range(1, scene.size - side - 1)
        spots = [(x0, obj.box[1]) for x0 in places]
        anywhere = [(x0, y0) for x0 in places for y0 in places]
        rng.shuffle(spots)
        rng.shuffle(anywhere)
        for x0, y0 in spots + anywhere:
            box = (x0, y0, x0 + side, y0 + side)
            moved = replace(obj, box=box)
            if not _free(box, others):
                continue
            if question.kind == "side":
                a, b = (moved, scene.objects[question.other]) if mover == question.target else (scene.objects[question.target], moved)
                holds = _relation_holds(a, b, f"{question.wrong} of")
            else:
                centre = moved.centre[0] - scene.size / 2
                holds = (centre < -4) if question.wrong == "left" else (centre > 4)
            if holds:
                objects = list(scene.objects)
                objects[mover] = moved
                return replace(scene, objects=tuple(objects))
    return None


def vqa_minimal_pair(vqa: ShapesVQA, index: int) -> VQAPair:
    """The two-choice question of sample ``index`` with its image and the image whose answer is the other option."""
    scene_index, question = vqa.question(index)
    if question.wrong is None:
        raise ValueError(f"sample {index} asks an open {question.kind!r} question; minimal pairs need two choices")
    scene = vqa.world.scene(scene_index)
    changed = _changed(scene, question, random.Random(f"pair:{vqa.world.seed}:{index}"))
    if changed is None:
        raise ValueError(f"no free place to change the {question.kind} of the object in sample {index}")
    return VQAPair(
        f"vqa-{vqa.world.seed}-{index}", question.text, question.answer, question.wrong, question.kind, question.roles,
        lambda: render(scene)[0], lambda: render(changed)[0],
    )


def symmetric_token_replacement(tokenizer: Any, text: str, words: list[str], candidates: list[str]) -> str:
    """``text`` with each of ``words`` replaced by a distinct candidate (not one of ``words``), keeping the token count."""
    length = len(tokenizer(text)["input_ids"])
    result, used = f" {text.replace('?', ' ?')} ", set(words)
    for word in words:
        if f" {word} " not in result:
            raise ValueError(f"{word!r} is not a word of {text!r}")
        for candidate in candidates:
            if candidate in used:
                continue
            trial = result.replace(f" {word} ", f" {candidate} ", 1)
            if len(tokenizer(" ".join(trial.split()).replace(" ?", "?"))["input_ids"]) == length:
                result = trial
                used.add(candidate)
                break
        else:
            raise ValueError(f"no candidate for {word!r} in {candidates} keeps the {length} tokens of {text!r}")
    return " ".join(result.split()).replace(" ?", "?")


def same_length_replacement(tokenizer: Any, text: str, word: str, candidates: list[str]) -> str:
    """``text`` with ``word`` replaced by the first candidate of the same token count (one-word STR)."""
    return symmetric_token_replacement(tokenizer, text, [word], [c for c in candidates if c != word])


def gaussian_noise(pixel_values: Tensor, std: float, seed: int) -> Tensor:
    """A noise-corrupted copy of ``pixel_values`` (the baseline NOTICE argues against; label it as such)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(pixel_values.shape, generator=generator, dtype=pixel_values.dtype)
    return pixel_values + std * noise.to(pixel_values.device)


def read_vqa_pairs(path: str | Path) -> tuple[list[VQAPair], list[Failure]]:
    """Probing pairs from a JSONL manifest (``id``, ``clean_image``, ``corrupt_image``, ``question``, ``answer``,
    ``wrong_answer``, optional ``kind``; image paths relative to the manifest). Bad records are skipped and listed."""
    from ..data.manifest import load_rgb

    path = Path(path)
    pairs, failures, seen = [], [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            failures.append(Failure(f"line-{number}", f"line {number} is not JSON: {err.msg}"))
            continue
        sample_id = str(row.get("id", f"line-{number}"))
        missing = [k for k in ("clean_image", "corrupt_image", "question", "answer", "wrong_answer") if not row.get(k)]
        if missing:
            failures.append(Failure(sample_id, f"missing {missing}"))
            continue
        if sample_id in seen:
            failures.append(Failure(sample_id, "duplicate id"))
            continue
        images = {k: (path.parent / row[k]) for k in ("clean_image", "corrupt_image")}
        absent = [str(p) for p in images.values() if not p.is_file()]
        if absent:
            failures.append(Failure(sample_id, f"image not found: {absent[0]}"))
            continue
        seen.add(sample_id)
        words = row["question"].replace("?", " ?").split()
        pairs.append(VQAPair(
            sample_id, row["question"], str(row["answer"]), str(row["wrong_answer"]), str(row.get("kind", "manifest")),
            tuple(row.get("roles") or words), partial(load_rgb, images["clean_image"]), partial(load_rgb, images["corrupt_image"]),
        ))
    return pairs, failures


__all__ = [
    "VQAPair",
    "gaussian_noise",
    "read_vqa_pairs",
    "same_length_replacement",
    "symmetric_token_replacement",
    "vqa_minimal_pair",
]
