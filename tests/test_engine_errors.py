"""Bad input gets a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch

from conftest import make_images, make_texts
from m2ib_lightning import attribute

IDS, MASK = make_texts([5, 7], seed=0)
PIXELS = make_images(2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(vision_layer=4), ValueError, r"vision_layer=4 is out of range: the image tower has 4 blocks, so use 0\.\.3 \(or -4\.\.-1"),
        (dict(text_layer=-5), ValueError, r"text_layer=-5 is out of range: the text tower has 4 blocks"),
        (dict(vision_layer=1.0), TypeError, r"vision_layer must be an int"),
        (dict(steps=0), ValueError, r"steps must be >= 1"),
        (dict(num_noise=0), ValueError, r"num_noise must be >= 1"),
        (dict(beta=float("nan")), ValueError, r"beta must be a finite number"),
        (dict(lr=0.0), ValueError, r"lr must be a finite number > 0"),
        (dict(seed=torch.tensor([1, 2, 3])), ValueError, r"seed has 3 entries for a batch of 2"),
        (dict(seed=torch.tensor([1.0, 2.0])), TypeError, r"seed must be an int or a 1-D integer tensor"),
    ],
)
def test_bad_settings(clip, kwargs, error, match):
    with pytest.raises(error, match=match):
        attribute(clip, PIXELS, IDS, MASK, **{"vision_layer": 1, "text_layer": 1, **kwargs})


def _call(clip, pixels=PIXELS, ids=IDS, mask=MASK):
    return attribute(clip, pixels, ids, mask, vision_layer=1, text_layer=1, steps=1, num_noise=1)


def test_empty_text(clip):
    with pytest.raises(ValueError, match="input_ids is empty"):
        _call(clip, ids=torch.zeros(2, 0, dtype=torch.long), mask=None)


def test_all_padding_text(clip):
    mask = MASK.clone()
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] are all padding"):
        _call(clip, mask=mask)


def test_batch_size_mismatch(clip):
    with pytest.raises(ValueError, match="batch size mismatch: pixel_values has 3 images, input_ids 2 texts"):
        _call(clip, pixels=make_images(3))


def test_wrong_pixel_rank(clip):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, C, H, W\)"):
        _call(clip, pixels=PIXELS[0])


def test_wrong_channel_count(clip):
    with pytest.raises(ValueError, match="pixel_values must have 3 channels"):
        _call(clip, pixels=PIXELS[:, :1])


def test_wrong_image_size(clip):
    with pytest.raises(ValueError, match="pixel_values must be 32x32 for this model, got 40x40"):
        _call(clip, pixels=make_images(2, size=40))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels(clip, bad):
    pixels = PIXELS.clone()
    pixels[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="pixel_values holds NaN or infinite values"):
        _call(clip, pixels=pixels)


def test_float_input_ids(clip):
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        _call(clip, ids=IDS.float())


def test_mask_shape_mismatch(clip):
    with pytest.raises(ValueError, match="attention_mask has shape"):
        _call(clip, mask=MASK[:, :3])


def test_text_without_eos(clip):
    ids = IDS.clone()
    ids[0, 4] = 5
    with pytest.raises(ValueError, match=r"input_ids rows \[0\] have no end-of-text token \(id 99\)"):
        _call(clip, ids=ids)


def test_text_longer_than_model_limit(clip):
    ids, mask = make_texts([20], seed=0)
    with pytest.raises(ValueError, match="more than the model's max_position_embeddings=16"):
        _call(clip, pixels=make_images(1), ids=ids, mask=mask)


def test_a_model_no_adapter_serves():
    with pytest.raises(ValueError, match="no registered backbone adapter accepts a Linear; registered adapters: hf_blip_itc"):
        attribute(torch.nn.Linear(2, 2), PIXELS, IDS, MASK)


def test_inference_mode_is_refused(clip):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="Trainer\\(inference_mode=False\\)"):
        _call(clip)
