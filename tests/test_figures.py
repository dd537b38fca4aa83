"""Every figure kind rendered on tiny data: its size, its colour bar, and a known hot patch where it should be."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib_lightning.viz.figures import heat_colours, heatmap_scale, labelled_heatmap, method_grid, pair_figure, tile_figures

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


def test_a_pair_figure_has_its_title_colour_bar_legend_and_the_hot_patch_where_it_is():
    figure = pair_figure(GREY, hot_map(), ["a", "red", "circle"], [0.0, 1.0, 0.5], scale=3, footer="answer (given): red",
                         title="shapes-1-0")
    width = 2 * 8 * 3
    assert figure.width == width and figure.height > 24 + 60  # title, image row, bar, words, legend, footer
    pixels = np.asarray(figure)
    top = 16  # the title's row
    assert _is_hot(pixels[top + 3 * 3 + 1, 24 + 3 * 6 - 1]) and _is_cold(pixels[top + 3 * 7, 24 + 3 * 1])
    assert tuple(pixels[top + 5, 5]) == (128, 128, 128)  # the image itself, untouched
    bar_row = pixels[top + 24 + 2]  # the colour bar under the overlay: cold on its left, hot on its right
    assert _is_cold(bar_row[24 + 1]) and _is_hot(bar_row[width - 2])


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
