"""Visual questions about the shapes world, with their answers, for training and probing a VQA model.

Two-choice questions follow NOTICE's form ("is the circle red or blue?", "is the
cross left or right of the circle?", "is the cross on the left or right?"); open
ones ask for one attribute ("what colour is the triangle?"). Every answer is a
single word of the world's vocabulary. An object is named by its shape when
that is unique in the scene, otherwise by colour and shape (never by the
attribute asked about); a question whose object cannot be named uniquely is
not asked. Every question is a pure function of (world seed, index).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from .world import COLOURS, SHAPES, SIZES, Scene, ShapeObject, ShapesWorld, WorldSample, _relation_holds

TWO_CHOICE_KINDS = ("colour", "shape", "size", "side", "place")
OPEN_KINDS = ("what_colour", "what_shape", "what_size")
QUESTION_KINDS = TWO_CHOICE_KINDS + OPEN_KINDS
SIDES = ("left", "right")
QUESTION_WORDS = ("is", "or", "of", "what", "colour", "shape", "size", "object", "the", "a", "?")


@dataclass(frozen=True)
class Question:
    """A question about one scene; ``wrong`` is the other option of a two-choice question (None when open)."""

    text: str
    answer: str
    wrong: str | None
    kind: str
    target: int  # index of the object asked about
    roles: tuple[str, ...]  # one role per word of ``text`` ("?" is a word), for aggregating by template
    other: int | None = None  # the second object of a side question


def _options(rng: random.Random, answer: str, others: list[str]) -> tuple[str, str, str]:
    """(first option, second option, wrong answer), the right answer first or second at random."""
    wrong = rng.choice(others)
    first, second = (answer, wrong) if rng.random() < 0.5 else (wrong, answer)
    return first, second, wrong


def _reference(scene: Scene, target: int, avoid: str | None = None) -> tuple[list[str], list[str]] | None:
    """Words naming object ``target`` uniquely without the attribute ``avoid``, and their roles."""
    objects, obj = scene.objects, scene.objects[target]
    same_shape = [o for o in objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return [obj.shape], ["NOUN"]
    if avoid != "colour" and sum(o.colour == obj.colour for o in same_shape) == 1:
        return [obj.colour, obj.shape], ["NOUN_COLOUR", "NOUN"]
    return None


def _question(words: list[str], roles: list[str], answer: str, wrong: str | None, kind: str, target: int,
              other: int | None = None) -> Question:
    text = " ".join(words[:-1]) + words[-1]  # "... blue" + "?"
    return Question(text, answer, wrong, kind, target, tuple(roles), other)


def ask(scene: Scene, target: int, kind: str, rng: random.Random, other: int | None = None) -> Question | None:
    """A question of ``kind`` about object ``target`` (and ``other``, for side questions), or None if it cannot be asked."""
    obj: ShapeObject = scene.objects[target]
    if kind == "colour":
        ref = _reference(scene, target, avoid="colour")
        if ref is None or ref[0] != [obj.shape]:
            return None
        a, b, wrong = _options(rng, obj.colour, [c for c in COLOURS if c != obj.colour])
        words = ["is", "the", obj.shape, a, "or", b, "?"]
        return _question(words, ["is", "the", "NOUN", "OPTION_A", "or", "OPTION_B", "?"], obj.colour, wrong, kind, target)
    if kind == "shape":
        if sum(o.colour == obj.colour for o in scene.objects) != 1:
            return None
        a, b, wrong = _options(rng, obj.shape, [s for s in SHAPES if s != obj.shape])
        words = ["is", "the", obj.colour, "shape", "a", a, "or", "a", b, "?"]
        roles = ["is", "the", "NOUN_COLOUR", "shape", "a", "OPTION_A", "or", "a", "OPTION_B", "?"]
        return _question(words, roles, obj.shape, wrong, kind, target)
    if kind == "size":
        ref = _reference(scene, target)
        if ref is None:
            return None
        a, b, wrong = _options(rng, obj.size, [s for s in SIZES if s != obj.size])
        words = ["is", "the", *ref[0], a, "or", b, "?"]
        return _question(words, ["is", "the", *ref[1], "OPTION_A", "or", "OPTION_B", "?"], obj.size, wrong, kind, target)
    if kind == "side":
        if other is None:
            return None
        ref_a, ref_b = _reference(scene, target), _reference(scene, other)
        o = scene.objects[other]
        if ref_a is None or ref_b is None or obj.shape == o.shape:
            return None
        if _relation_holds(obj, o, "left of"):
            answer = "left"
        elif _relation_holds(obj, o, "right of"):
            answer = "right"
        else:
            return None
        a, b, wrong = _options(rng, answer, [s for s in SIDES if s != answer])
        words = ["is", "the", *ref_a[0], a, "or", b, "of", "the", *ref_b[0], "?"]
        roles = ["is", "the", *ref_a[1], "OPTION_A", "or", "OPTION_B", "of", "the",
                 *[f"{r}_2" for r in ref_b[1]], "?"]
        return _question(words, roles, answer, wrong, kind, target, other)
    if kind == "place":  # the image half the object is in: an easier step towards relations
        ref = _reference(scene, target)
        if ref is None or abs(obj.centre[0] - scene.size / 2) < 4:
            return None
        answer = "left" if obj.centre[0] < scene.size / 2 else "right"
        a, b, wrong = _options(rng, answer, [s for s in SIDES if s != answer])
        words = ["is", "the", *ref[0], "on", "the", a, "or", b, "?"]
        roles = ["is", "the", *ref[1], "on", "the", "OPTION_A", "or", "OPTION_B", "?"]
        return _question(words, roles, answer, wrong, kind, target)
    if kind == "what_colour":
        ref = _reference(scene, target, avoid="colour")
        if ref is None or ref[0] != [obj.shape]:
            return None
        return _question(["what", "colour", "is", "the", obj.shape, "?"], ["what", "colour", "is", "the", "NOUN", "?"],
                         obj.colour, None, kind, target)
    if kind == "what_shape":
        if sum(o.colour == obj.colour for o in scene.objects) != 1:
            return None
        words = ["what", "shape", "is", "the", obj.colour, "object", "?"]
        return _question(words, ["what", "shape", "is", "the", "NOUN_COLOUR", "object", "?"], obj.shape, None, kind, target)
    if kind == "what_size":
        ref = _reference(scene, target)
        if ref is None:
            return None
        return _question(["what", "size", "is", "the", *ref[0], "?"], ["what", "size", "is", "the", *ref[1], "?"],
                         obj.size, None, kind, target)
    raise ValueError(f"kind must be one of {QUESTION_KINDS}, got {kind!r}")


def _askable(scene: Scene, kind: str, rng: random.Random) -> Iterator[Question]:
    """The questions of ``kind`` the scene's objects allow, the objects in a random order (the first other one of
    that order is a side question's second object)."""
    order = list(range(len(scene.objects)))
    rng.shuffle(order)
    for target in order:
        others = [o for o in order if o != target]
        question = ask(scene, target, kind, rng, others[0] if others else None)
        if question is not None:
            yield question


@dataclass
class VQASample:
    id: str
    scene_index: int
    question: Question
    sample: WorldSample


class ShapesVQA:
    """Questions over a :class:`ShapesWorld`: sample ``i`` asks a question of kind ``kinds[i % len(kinds)]``.

    The scene is the first of ``world.scene(i * 64 + attempt)`` on which that kind can be asked.
    """

    ATTEMPTS = 64

    def __init__(self, world: ShapesWorld, kinds: tuple[str, ...] = QUESTION_KINDS):
        unknown = set(kinds) - set(QUESTION_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {QUESTION_KINDS}, got {list(kinds)}")
        self.world, self.kinds = world, tuple(kinds)

    def question(self, index: int) -> tuple[int, Question]:
        """The scene index and question of sample ``index``, without drawing anything."""
        kind = self.kinds[index % len(self.kinds)]
        for attempt in range(self.ATTEMPTS):
            scene_index = index * self.ATTEMPTS + attempt
            scene = self.world.scene(scene_index)
            rng = random.Random(f"vqa:{self.world.seed}:{scene_index}:{kind}")
            question = next(_askable(scene, kind, rng), None)
            if question is not None:
                return scene_index, question
        raise ValueError(f"no scene for a {kind!r} question near sample {index}")  # never seen in practice

    def conversation(self, index: int, turns: int) -> tuple[int, list[Question]]:
        """A scene and up to ``turns`` different questions about it (at least one), for training a model that reads
        the image once for several questions: the kinds in a random order, each asked about a random object."""
        for attempt in range(self.ATTEMPTS):
            scene_index = index * self.ATTEMPTS + attempt
            scene = self.world.scene(scene_index)
            rng = random.Random(f"vqa-conversation:{self.world.seed}:{scene_index}")
            kinds, asked = list(self.kinds), {}
            rng.shuffle(kinds)
            for kind in kinds:
                question = next((q for q in _askable(scene, kind, rng) if q.text not in asked), None)
                if question is not None:
                    asked[question.text] = question
                if len(asked) == turns:
                    break
            if asked:
                return scene_index, list(asked.values())
        raise ValueError(f"no scene for a conversation near sample {index}")  # never seen in practice

    def sample(self, index: int) -> VQASample:
        scene_index, question = self.question(index)
        sample = self.world.sample(scene_index)
        return VQASample(f"vqa-{self.world.seed}-{index}", scene_index, question, sample)


def vqa_vocabulary() -> list[str]:
    """Every word a question or answer can use."""
    from .world import vocabulary

    return list(dict.fromkeys([*vocabulary(), *QUESTION_WORDS]))
