"""A synthetic image-caption world with ground truth: shapes, colours, sizes, positions.

Every sample is a pure function of (world seed, index): the same seed gives the
same images, captions and masks on any machine. Objects never overlap, and
shapes are drawn without anti-aliasing, so an object's mask is exactly the set
of pixels painted in its colour. A caption names one or two objects; the
sample's ``target_mask`` is the union of the masks of what it names.
:meth:`ShapesWorld.minimal_pair` changes one attribute of one object and
returns the two scenes with their two captions, for probing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.22), "large": (0.30, 0.38)}  # side / image side
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS = ("plain", "stripes", "checker")
Attribute = Literal["colour", "shape", "position"]


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def phrase(self, with_size: bool = False) -> str:
        words = [self.size, self.colour, self.shape] if with_size else [self.colour, self.shape]
        return " ".join(["an" if words[0][0] in "aeiou" else "a", *words])


@dataclass(frozen=True)
class Caption:
    """What a caption says: one or two named objects, optionally a spatial relation between them."""

    text: str
    named: tuple[tuple[str, str, str | None], ...]  # (colour, shape, size or None) per named object
    relation: str | None = None

    def describes(self, scene: "Scene") -> bool:
        """True if the caption is a correct description of ``scene`` (used for positives and distractors)."""
        matches = [[i for i, o in enumerate(scene.objects) if _matches(o, spec)] for spec in self.named]
        if any(not m for m in matches):
            return False
        if self.relation in ("on the left", "on the right"):
            left = self.relation == "on the left"
            return any((scene.objects[a].centre[0] < scene.size / 2) == left for a in matches[0])
        if self.relation is None:
            return len(self.named) == 1 or any(a != b for a in matches[0] for b in matches[1])
        return any(
            a != b and _relation_holds(scene.objects[a], scene.objects[b], self.relation)
            for a in matches[0]
            for b in matches[1]
        )


def _matches(obj: ShapeObject, spec: tuple[str, str, str | None]) -> bool:
    colour, shape, size = spec
    return obj.colour == colour and obj.shape == shape and (size is None or obj.size == size)


def _relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Strict relations: the boxes are separated along that axis."""
    return {
        "left of": a.box[2] < b.box[0],
        "right of": a.box[0] > b.box[2],
        "above": a.box[3] < b.box[1],
        "below": a.box[1] > b.box[3],
    }[relation]


def _free(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]]) -> bool:
    """No overlap with any taken box, with a 2-pixel gap."""
    return all(box[2] + 2 < t[0] or t[2] + 2 < box[0] or box[3] + 2 < t[1] or t[3] + 2 < box[1] for t in taken)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str
    background_colour: tuple[int, int, int]
    noise: float
    noise_seed: int
    size: int


@dataclass
class WorldSample:
    """One image-caption pair with its ground truth."""

    id: str
    scene: Scene
    caption: Caption
    referred: tuple[int, ...]  # indices of the objects the caption names
    image: Image.Image = field(repr=False)
    object_masks: np.ndarray = field(repr=False)  # (N, H, W) bool

    @property
    def text(self) -> str:
        return self.caption.text

    @property
    def target_mask(self) -> np.ndarray:
        """(H, W) bool: the pixels of the objects the caption names."""
        return self.object_masks[list(self.referred)].any(0)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [o.box for o in self.scene.objects]


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        w = (x1 - x0) / 3
        h = (y1 - y0) / 3
        return [
            (x0 + w, y0), (x1 - w, y0), (x1 - w, y0 + h), (x1, y0 + h), (x1, y1 - h), (x1 - w, y1 - h),
            (x1 - w, y1), (x0 + w, y1), (x0 + w, y1 - h), (x0, y1 - h), (x0, y0 + h), (x0 + w, y0 + h),
        ]
    return None


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill) -> None:
    polygon = _polygon(obj.shape, obj.box)
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """Draw a scene: the RGB image and one boolean mask per object."""
    n = scene.size
    ys, xs = np.mgrid[0:n, 0:n]
    base = np.zeros((n, n, 3), dtype=np.float32) + np.array(scene.background_colour, dtype=np.float32)
    if scene.background == "stripes":
        base *= (0.75 + 0.25 * ((xs + ys) // 4 % 2))[..., None]
    elif scene.background == "checker":
        base *= (0.8 + 0.2 * ((xs // 8 + ys // 8) % 2))[..., None]
    if scene.noise > 0:
        rng = np.random.default_rng(scene.noise_seed)
        base += rng.normal(0, scene.noise * 255, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    masks = np.zeros((len(scene.objects), n, n), dtype=bool)
    for i, obj in enumerate(scene.objects):
        _draw(draw, obj, COLOURS[obj.colour])
        mask = Image.new("1", (n, n), 0)
        _draw(ImageDraw.Draw(mask), obj, 1)
        masks[i] = np.asarray(mask, dtype=bool)
    return image, masks


class ShapesWorld:
    """Deterministic generator of scenes, captions and minimal pairs.

    ``sample(i)`` depends only on (seed, i). Held-out splits use another seed.
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 3,
        backgrounds: tuple[str, ...] = BACKGROUNDS,
        noise: float = 0.03,
    ):
        if not 1 <= max_objects <= 4:
            raise ValueError(f"max_objects must be in 1..4, got {max_objects}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        unknown = set(backgrounds) - set(BACKGROUNDS)
        if unknown:
            raise ValueError(f"backgrounds has unknown entries {sorted(unknown)}; choose from {BACKGROUNDS}")
        self.seed, self.image_size, self.max_objects = seed, image_size, max_objects
        self.backgrounds, self.noise = tuple(backgrounds), noise

    def _rng(self, index: int, salt: int = 0) -> random.Random:
        return random.Random(f"{self.seed}:{index}:{salt}")

    def _place(self, rng: random.Random, size: str, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
        n = self.image_size
        for _ in range(50):
            side = int(round(rng.uniform(*SIZES[size]) * n))
            x0, y0 = rng.randint(1, n - side - 2), rng.randint(1, n - side - 2)
            box = (x0, y0, x0 + side, y0 + side)
            if _free(box, taken):
                return box
        return None

    def scene(self, index: int) -> Scene:
        rng = self._rng(index)
        count = rng.randint(1, self.max_objects)
        objects: list[ShapeObject] = []
        for _ in range(count):
            size = rng.choice(tuple(SIZES))
            box = self._place(rng, size, [o.box for o in objects])
            if box is None:
                continue
            objects.append(ShapeObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, box))
        grey = rng.randint(60, 140)
        tint = tuple(min(255, max(0, grey + rng.randint(-20, 20))) for _ in range(3))
        return Scene(tuple(objects), rng.choice(self.backgrounds), tint, self.noise, rng.randint(0, 2**31), self.image_size)

    def caption(self, scene: Scene, rng: random.Random) -> tuple[Caption, tuple[int, ...]]:
        """A true caption naming one object, or two with a relation, that identifies what it names."""
        objects = scene.objects
        order = list(range(len(objects)))
        rng.shuffle(order)
        if len(objects) >= 2 and rng.random() < 0.4:
            a, b = order[0], order[1]
            holding = [r for r in RELATIONS if _relation_holds(objects[a], objects[b], r)]
            relation = rng.choice(holding) if holding and rng.random() < 0.7 else None
            joiner = f" {relation} " if relation else " and "
            text = objects[a].phrase() + joiner + objects[b].phrase()
            named = ((objects[a].colour, objects[a].shape, None), (objects[b].colour, objects[b].shape, None))
            return Caption(text, named, relation), (a, b)
        target = order[0]
        obj = objects[target]
        with_size = rng.random() < 0.5
        spec = (obj.colour, obj.shape, obj.size if with_size else None)
        return Caption(obj.phrase(with_size), (spec,)), (target,)

    def _referred(self, scene: Scene, caption: Caption, preferred: tuple[int, ...]) -> tuple[int, ...]:
        """Every object the caption's noun phrases match (two identical objects are both referred to)."""
        referred = {i for i, o in enumerate(scene.objects) for spec in caption.named if _matches(o, spec)}
        return tuple(sorted(referred | set(preferred)))

    def sample_id(self, index: int) -> str:
        return f"shapes-{self.seed}-{index}"

    def caption_of(self, index: int) -> tuple[Caption, tuple[int, ...]]:
        """The caption of sample ``index`` and the objects it names, without drawing anything."""
        return self.caption(self.scene(index), self._rng(index, 1))

    def sample(self, index: int) -> WorldSample:
        scene = self.scene(index)
        caption, named = self.caption_of(index)
        image, masks = render(scene)
        return WorldSample(self.sample_id(index), scene, caption, self._referred(scene, caption, named), image, masks)

    def minimal_pair(self, index: int, attribute: Attribute | None = None) -> tuple[WorldSample, WorldSample, Attribute]:
        """The scene of ``index`` and a copy with one attribute of one object changed, with matching captions.

        The clean caption names the changed object alone; the corrupted caption
        names it with its new attribute. Colour and shape changes keep every
        pixel outside the object; a position change moves it to a free place.
        """
        rng = self._rng(index, 2)
        scene = self.scene(index)
        target = rng.randrange(len(scene.objects))
        attributes: list[Attribute] = [attribute] if attribute else ["colour", "shape", "position"]
        for choice in rng.sample(attributes, len(attributes)):
            changed = self._change(rng, scene, target, choice)
            if changed is not None:
                break
        else:
            raise ValueError(f"no free place to move object {target} of scene {index}")
        samples = []
        for tag, changed_scene in (("clean", scene), ("corrupt", changed)):
            o = changed_scene.objects[target]
            if choice == "position":
                side = "left" if o.centre[0] < changed_scene.size / 2 else "right"
                cap = Caption(f"{o.phrase()} on the {side}", ((o.colour, o.shape, None),), f"on the {side}")
            else:
                cap = Caption(o.phrase(), ((o.colour, o.shape, None),))
            image, masks = render(changed_scene)
            samples.append(WorldSample(f"shapes-{self.seed}-{index}-{tag}", changed_scene, cap, (target,), image, masks))
        return samples[0], samples[1], choice

    def _change(self, rng: random.Random, scene: Scene, target: int, attribute: Attribute) -> Scene | None:
        obj = scene.objects[target]
        if attribute == "colour":
            new = replace(obj, colour=rng.choice([c for c in COLOURS if c != obj.colour]))
        elif attribute == "shape":
            new = replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
        else:
            # Move the object to the other half of the image, so that "on the left/right" flips.
            side = obj.box[2] - obj.box[0]
            others = [o.box for i, o in enumerate(scene.objects) if i != target]
            was_left = obj.centre[0] < scene.size / 2
            for _ in range(100):
                x0, y0 = rng.randint(1, scene.size - side - 2), rng.randint(1, scene.size - side - 2)
                box = (x0, y0, x0 + side, y0 + side)
                flipped = ((x0 + side / 2) < scene.size / 2) != was_left
                if flipped and _free(box, others):
                    break
            else:
                return None
            new = replace(obj, box=box)
        objects = list(scene.objects)
        objects[target] = new
        return replace(scene, objects=tuple(objects))


def vocabulary() -> list[str]:
    """Every word a caption of this world can use, in a fixed order."""
    words = ["a", "an", "and", "on", "the", "left", "right", *SIZES, *COLOURS, *SHAPES]
    for relation in RELATIONS:
        words.extend(w for w in relation.split() if w not in words)
    return list(dict.fromkeys(words))
