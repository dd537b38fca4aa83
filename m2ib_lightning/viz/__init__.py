"""Every figure of the project: ``show`` / ``show_map`` here, to plot a map in Python; ``figures`` the ones runs write
(overlays, the evaluation grid, probe heat maps, head overlays).

Plotting a map in Python, as Captum's ``visualize_image_attr`` and pytorch-grad-cam's ``show_cam_on_image`` do:
the image, the map over it with a colour bar saying what its values mean, and the words coloured by the text map
with their own scale.

>>> from m2ib_lightning.viz import show
>>> figure = show(record, image)          # a record of read_attributions(output_dir), its PIL image
>>> figure.savefig("explained.png")
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..backbones.base import clean_token
from .figures import SEQUENTIAL


def _array(values: Any) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float32)


def show_map(image: Any, image_map: Any, tokens: Sequence[str] | None = None, weights: Any = None, *,
             title: str | None = None, map_label: str = "image map (min-max: 0 least, 1 most information kept)",
             text_label: str = "text map (min-max over the words)", alpha: float = 0.55):
    """A matplotlib figure: the image, the map over it (``alpha``) with its colour bar, and under them ``tokens``
    coloured by ``weights`` (values in [0, 1]) with a colour bar of their own. ``image``: a PIL image or an
    (H, W, 3) array; the map is resized to it (nearest neighbour, so patches stay visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    picture = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    heat = _array(image_map)
    if heat.shape != picture.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize(picture.shape[1::-1], Image.NEAREST))
    words = tokens is not None and len(tokens) > 0
    figure = plt.figure(figsize=(7.2, 4.6 if words else 3.8))
    grid = figure.add_gridspec(2 if words else 1, 2, height_ratios=[4, 1] if words else [1], hspace=0.35)
    left, right = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    left.imshow(picture)
    left.set_title("image", fontsize=9)
    right.imshow(picture)
    shown = right.imshow(heat, cmap=SEQUENTIAL, vmin=0.0, vmax=1.0, alpha=alpha)
    right.set_title("map over the image", fontsize=9)
    for axes in (left, right):
        axes.set_xticks([])
        axes.set_yticks([])
    bar = figure.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    bar.set_label(map_label, fontsize=7)
    if words:
        strip = figure.add_subplot(grid[1, :])
        strip.set_axis_off()
        values = np.clip(_array(weights), 0, 1)
        colours = matplotlib.colormaps["Reds"]
        renderer = figure.canvas.get_renderer()
        span = strip.get_window_extent(renderer).width
        x, y = 0.0, 0.8
        for token, value in zip(tokens, values):
            text = strip.text(x, y, token, fontsize=9, va="center", transform=strip.transAxes,
                              color="white" if value > 0.6 else "black",  # readable on the darkest reds
                              bbox={"facecolor": colours(float(value)), "edgecolor": "none", "pad": 2})
            width = text.get_window_extent(renderer).width / span + 0.012
            if x > 0 and x + width > 1:  # wrap: the word starts the next line
                x, y = 0.0, y - 0.35
                text.set_position((x, y))
            x += width
        scale = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=colours)
        word_bar = figure.colorbar(scale, ax=strip, orientation="horizontal", fraction=0.25, pad=0.05, aspect=40)
        word_bar.set_label(text_label, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def show(record: Any, image: Any, *, title: str | None = None, alpha: float = 0.55):
    """The figure of one record of ``read_attributions(output_dir)`` over its ``image`` (the picture, as the model
    saw it or at its original size with ``read_attributions(..., original_size=True)``): the image map, the words of
    the caption or question coloured by the text map (special and template tokens left out) and, for a VQA run, the
    answer explained."""
    special = record.special or [False] * len(record.tokens)
    keep = [i for i, hidden in enumerate(special) if not hidden]
    weights = record.text_map[keep] if keep else record.text_map[:0]
    if len(keep):
        weights = (weights - weights.min()) / (weights.max() - weights.min()) if weights.max() > weights.min() else weights * 0
    heading = title or record.id + (f" | answer ({record.answer_source}): {record.answer}" if record.answer else "")
    return show_map(image, record.image_map, [clean_token(record.tokens[i]) for i in keep], weights, title=heading,
                    alpha=alpha)
