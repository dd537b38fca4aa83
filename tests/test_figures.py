"""Every figure kind rendered on tiny data: its size, its colour bar, and a known hot patch where it should be."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib_lightning.viz.figures import heat_colours, heatmap_scale, labelled_heatmap, method_grid, prediction_figure, tile_figures

GREY = np.full((8, 8, 3), 128, dtype=np.uint8)


def hot_map() -> np.ndarray:
    """1 on the patch at rows 2-3, columns 5-6 of an 8 x 8 map, 0 elsewhere."""
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[2:4, 5:7] = 1.0
    return heat


def _is_hot(pixel) -> bool:
    return pixel[0] > 140 and pixel[0] > pixel[1] and pixel[2] < 100  # the red end of the ramp, blended


def _is_cold(pixel) -> bool:
    return pixel[2] > pixel[0] + 30  # the blue end


def test_a_run_overlay_is_drawn_by_show_map_with_the_hot_patch_where_it_is(monkeypatch):
    """The overlays runs write (and TensorBoard shows) are viz.show_map's figure: title with the answer, both colour
    bars, and in the saved pixels the hot patch over its place in the picture, the cold rest dark."""
    import matplotlib.figure

    import m2ib_lightning.viz as viz

    drawn = {}
    original = viz.show_map

    def keep(*args, **kwargs):
        drawn["figure"] = original(*args, **kwargs)
        return drawn["figure"]

    monkeypatch.setattr(viz, "show_map", keep)
    capacity = torch.zeros(4, 4)
    capacity[1, 2] = 1.0  # the patch at rows 8-15, columns 16-23 of a 32 px picture
    prediction = {"image_capacity": capacity[None], "lengths": torch.tensor([3]), "image_size": (32, 32),
                  "pixel_values": torch.zeros(1, 3, 32, 32), "tokens": [["<s>", "red", "circle"]],
                  "special": [[True, False, False]], "text_maps": torch.tensor([[0.0, 1.0, 0.5]]), "id": ["shapes-1-0"],
                  "answer": ["red"], "answer_source": ["given"]}
    image = prediction_figure(prediction, 0, lambda pixels: np.full((32, 32, 3), 128, dtype=np.uint8))
    figure = drawn["figure"]
    assert isinstance(figure, matplotlib.figure.Figure) and image.size == (720, 460)
    assert figure._suptitle.get_text() == "shapes-1-0 | answer (given): red"
    assert [a.get_label() for a in figure.axes].count("<colorbar>") == 2
    x0, y0, x1, y1 = figure.axes[1].get_window_extent().extents  # the overlay's axes, in the saved pixels
    pixels = np.asarray(image).astype(int)
    at = lambda row, col: pixels[int(image.height - y1 + (row + 0.5) / 32 * (y1 - y0)), int(x0 + (col + 0.5) / 32 * (x1 - x0))]  # noqa: E731
    assert at(11, 19).mean() > 150 and at(27, 4).mean() < 90  # bilinear upsampling peaks on the hot patch


def test_the_evaluation_grid_names_each_method_captions_each_row_and_has_its_colour_bar():
    heats = {"m2ib": [hot_map(), hot_map()], "random": [np.zeros((8, 8)), np.ones((8, 8))]}
    sheet = method_grid([GREY, GREY], heats, scale=4, captions=["p0: a red circle", "p1: a blue square"])
    cell = 32
    assert sheet.width == 3 * cell and sheet.height == 18 + 2 * (cell + 16) + 36 + 4
    pixels = np.asarray(sheet)
    assert _is_hot(pixels[18 + 4 * 2 + 1, cell + 4 * 5 + 1]) and _is_cold(pixels[18 + 4 * 7, cell + 4 * 1])
    header = pixels[:18]
    assert (header < 100).any()  # the names are drawn: dark text on white
    assert (pixels[18 + cell: 18 + cell + 16] < 100).any()  # the first row's caption


def test_head_overlays_let_the_image_show_where_the_map_is_low_and_carry_a_scale():
    from m2ib_lightning.viz.figures import overlay

    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    picture[..., 1] = 200  # a green image
    tile = np.asarray(overlay(picture, hot_map(), alpha=0.7, by_value=True))
    assert tuple(tile[0, 0]) == (0, 200, 0) and _is_hot(tile[2, 5])  # no solid background where the map is 0
    sheet = tile_figures([("colour: layer 1 head 2, at 'circle'", Image.fromarray(tile))], columns=1, scale="attention")
    assert sheet.height == 8 + 16 + 36 + 4


@pytest.mark.parametrize("values,cmap,low", [(np.array([[0.0, 0.5], [1.0, 2.0]]), "inferno", 0.0),
                                              (np.array([[-1.0, 0.5], [np.nan, 2.0]]), "RdBu_r", -2.0)])
def test_probe_heat_maps_are_sequential_for_non_negative_values_and_diverging_for_signed_ones(values, cmap, low):
    assert heatmap_scale(values) == (cmap, low, 2.0)
    png = labelled_heatmap(torch.tensor(values), ["h0", "h1"], "effects", "head")
    assert Image.open(io.BytesIO(png)).size[0] >= 400


def test_show_draws_the_map_over_the_image_with_colour_bars_for_the_map_and_the_words(tmp_path):
    from types import SimpleNamespace

    from m2ib_lightning.viz import show

    record = SimpleNamespace(id="p0", tokens=["<s>", "a", "red</w>", "circle</w>", "</s>"],
                             special=[True, False, False, False, True], text_map=torch.tensor([0.0, 0.2, 1.0, 0.6, 0.0]),
                             image_map=torch.tensor(hot_map()), answer=None, answer_source=None)
    figure = show(record, Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)))
    labels = [axes.get_label() for axes in figure.axes]
    assert len(figure.axes) == 5 and labels.count("<colorbar>") == 2  # image, overlay, words, and two colour bars
    overlay_axes = figure.axes[1]
    heat = overlay_axes.images[1].get_array()
    assert heat.shape == (32, 32) and heat[2 * 4 + 1, 5 * 4 + 1] == 1.0 and heat[0, 0] == 0.0
    words = [text.get_text() for axes in figure.axes for text in axes.texts]
    assert words == ["a", "red", "circle"]  # special tokens left out, markers stripped
    assert figure._suptitle.get_text() == "p0"
    figure.savefig(tmp_path / "shown.png")
    assert Image.open(tmp_path / "shown.png").size[0] > 500


def test_the_heat_ramp_goes_from_blue_to_red_and_shows_nan_as_zero():
    colours = heat_colours(np.array([0.0, 1.0, np.nan]))
    assert _is_cold(colours[0]) and _is_hot(colours[1]) and (colours[2] == colours[0]).all()
