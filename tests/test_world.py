"""The shapes world: deterministic, masks exact, captions true, minimal pairs minimal."""

from __future__ import annotations

import numpy as np
import pytest

from m2ib_lightning.shapes.world import COLOURS, SHAPES, ShapesWorld, vocabulary
from m2ib_lightning.shapes.models.shapes_clip import build_tokenizer

INDICES = range(60)


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = ShapesWorld(seed=3), ShapesWorld(seed=3), ShapesWorld(seed=4)
    for i in range(10):
        sa, sb = a.sample(i), b.sample(i)
        assert sa.text == sb.text and sa.scene == sb.scene
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
        assert np.array_equal(sa.object_masks, sb.object_masks)
    assert [a.sample(i).scene for i in range(10)] != [c.sample(i).scene for i in range(10)]


@pytest.mark.parametrize("index", INDICES)
def test_masks_match_drawn_pixels(index):
    sample = ShapesWorld(seed=0).sample(index)
    pixels = np.asarray(sample.image)
    masks = sample.object_masks
    assert masks.shape == (len(sample.scene.objects), 64, 64)
    assert masks.sum(0).max() <= 1, "objects overlap"
    for obj, mask in zip(sample.scene.objects, masks):
        assert mask.sum() > 20
        assert (pixels[mask] == COLOURS[obj.colour]).all(), "a masked pixel is not the object's colour"
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = obj.box
        assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
    background = ~masks.any(0)
    for colour in COLOURS.values():
        assert not (pixels[background] == colour).all(-1).any(), "an object colour outside every mask"


@pytest.mark.parametrize("index", INDICES)
def test_captions_name_what_is_drawn(index):
    sample = ShapesWorld(seed=0).sample(index)
    assert sample.caption.describes(sample.scene)
    words = sample.text.split()
    assert set(words) <= set(vocabulary())
    for colour, shape, size in sample.caption.named:
        assert any(o.colour == colour and o.shape == shape and size in (None, o.size) for o in sample.scene.objects)
        assert colour in words and shape in words
    referred = [sample.scene.objects[i] for i in sample.referred]
    assert all(any(o.colour == c and o.shape == s for c, s, _ in sample.caption.named) for o in referred)
    assert sample.target_mask.sum() == sample.object_masks[list(sample.referred)].sum()


def test_world_has_variety():
    samples = [ShapesWorld(seed=0).sample(i) for i in range(300)]
    objects = [o for s in samples for o in s.scene.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {len(s.scene.objects) for s in samples} == {1, 2, 3}
    assert {s.scene.background for s in samples} == {"plain", "stripes", "checker"}
    assert any(s.caption.relation for s in samples) and any(len(s.caption.named) == 2 for s in samples)


@pytest.mark.parametrize("attribute", ["colour", "shape", "position"])
@pytest.mark.parametrize("index", range(15))
def test_minimal_pairs_differ_in_exactly_one_attribute(index, attribute):
    world = ShapesWorld(seed=0)
    if attribute == "position" and index == 13:  # a crowded scene: its object cannot change sides
        with pytest.raises(ValueError, match="no free place to move object"):
            world.minimal_pair(index, attribute)
        clean, corrupt, changed = world.minimal_pair(index)  # then another attribute is chosen
        attribute = changed
    else:
        clean, corrupt, changed = world.minimal_pair(index, attribute)
    assert changed == attribute
    assert clean.scene.background == corrupt.scene.background and clean.scene.noise_seed == corrupt.scene.noise_seed
    (target,) = clean.referred
    assert corrupt.referred == (target,)
    for i, (a, b) in enumerate(zip(clean.scene.objects, corrupt.scene.objects)):
        if i != target:
            assert a == b
            continue
        fields = {"colour": a.colour != b.colour, "shape": a.shape != b.shape, "position": a.box != b.box}
        assert fields == {name: name == attribute for name in fields}
        assert a.size == b.size
    changed_pixels = (np.asarray(clean.image) != np.asarray(corrupt.image)).any(-1)
    assert changed_pixels.any()
    assert not (changed_pixels & ~(clean.object_masks[target] | corrupt.object_masks[target])).any()
    assert clean.text != corrupt.text
    assert clean.caption.describes(clean.scene) and corrupt.caption.describes(corrupt.scene)
    original = clean.scene.objects[target]
    others = [o for i, o in enumerate(corrupt.scene.objects) if i != target]
    if not any(o.colour == original.colour and o.shape == original.shape for o in others):
        assert not clean.caption.describes(corrupt.scene), "the clean caption still fits the corrupted scene"


def test_tokenizer_covers_the_world_and_keeps_eos_off_id_two():
    tokenizer = build_tokenizer()
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and tokenizer.eos_token_id != 2
    for i in range(100):
        ids = tokenizer(ShapesWorld(seed=0).sample(i).text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) <= tokenizer.model_max_length


def test_bad_world_settings():
    with pytest.raises(ValueError, match="max_objects must be in 1..4"):
        ShapesWorld(max_objects=0)
    with pytest.raises(ValueError, match="backgrounds has unknown entries"):
        ShapesWorld(backgrounds=("plain", "marble"))
