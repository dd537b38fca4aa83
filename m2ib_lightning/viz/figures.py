"""Every figure of the project: heat-map overlays and coloured tokens (Pillow), and labelled layer x head / position
heat maps of probing effects (matplotlib)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import torch
from torch import Tensor

from ..backbones.base import clean_token
from ..engine import image_maps_from_capacity, minmax

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_FONT = ImageFont.load_default(size=12)
_SMALL = ImageFont.load_default(size=10)
MAP_SCALE = "min-max: 0 least, 1 most information kept"
#: the colour maps of the figures: sequential for never-negative values (maps, capacities, effects' size), diverging
#: (centred on 0) for signed ones
SEQUENTIAL, DIVERGING = "inferno", "RdBu_r"


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 along a blue-cyan-yellow-red ramp (NaN, a map a method lacks, as 0)."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    position = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, by_value: bool = False) -> Image.Image:
    """The image with the heat map blended on top, both (H, W[, 3]); ``by_value``: each pixel's opacity is its value
    times ``alpha``, so the image shows through where the map is low."""
    weight = alpha * (np.clip(np.nan_to_num(heat), 0, 1)[..., None] if by_value else 1.0)
    blended = image.astype(np.float32) * (1 - weight) + heat_colours(heat).astype(np.float32) * weight
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


def colour_bar(width: int, label: str = MAP_SCALE) -> Image.Image:
    """A horizontal colour bar of the heat ramp, 0 on the left and 1 on the right, with ``label`` under it."""
    ramp = heat_colours(np.linspace(0, 1, width)[None].repeat(8, 0))
    bar = Image.new("RGB", (width, 8 + 28), "white")
    bar.paste(Image.fromarray(ramp, "RGB"), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((0, 9), "0", fill="black", font=_SMALL)
    draw.text((width - 8, 9), "1", fill="black", font=_SMALL)
    draw.text((14, 9), label[: max(1, (width - 28) // 5)], fill="black", font=_SMALL)
    return bar


def display_text(tokens: list[str], special: list[bool], weights: Tensor) -> tuple[list[str], list[float]]:
    """The text map as the official plots show it: special tokens (BOS/EOS/CLS/SEP/padding) left out, markers
    (``</w>``, ``##``) stripped, and the remaining weights min-maxed again."""
    keep = [i for i, is_special in enumerate(special) if not is_special]
    if not keep:
        return [], []
    kept = minmax(weights[keep][None].float())[0]
    return [clean_token(tokens[i]) for i in keep], kept.tolist()


def figure_image(figure: "Figure") -> Image.Image:
    """A matplotlib figure rendered to an RGB image (and closed), without a PNG round trip."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    image = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    plt.close(figure)
    return image


def prediction_figure(prediction: dict, row: int, display_image: Callable[[Tensor], np.ndarray]) -> Image.Image:
    """The overlay of one row of an ``M2IBModule`` (or ``AnswerM2IBModule``) ``predict_step`` output, drawn by
    :func:`m2ib_lightning.viz.show_map` (what ``viz.show`` draws for a stored record): the sample's id (and, for a
    question, the answer explained) as its title; ``display_image`` is the adapter's."""
    from . import show_map

    capacity, length = prediction["image_capacity"][row], int(prediction["lengths"][row])
    heat = image_maps_from_capacity(capacity.flatten()[None], tuple(capacity.shape), prediction["image_size"])[0]
    image = display_image(prediction["pixel_values"][row])
    tokens, weights = display_text(
        prediction["tokens"][row][:length], prediction["special"][row][:length], prediction["text_maps"][row, :length]
    )
    title = str(prediction["id"][row])
    if "answer" in prediction:
        title += f" | answer ({prediction['answer_source'][row]}): {prediction['answer'][row]}"
    return figure_image(show_map(image, heat.numpy(), tokens, weights, title=title))


def grid(figures: list[Image.Image], columns: int = 4) -> Image.Image:
    """Figures tiled in rows of ``columns``."""
    width = max(f.width for f in figures)
    height = max(f.height for f in figures)
    rows = (len(figures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, figure in enumerate(figures):
        sheet.paste(figure, ((i % columns) * width, (i // columns) * height))
    return sheet


def method_grid(images: list[np.ndarray], heats: dict[str, list[np.ndarray]], scale: int = 3,
                captions: list[str] | None = None) -> Image.Image:
    """One row per sample: the image, then each method's map over it; method names on top (12 px), each row's caption
    (the sample's text) under it, the maps' colour bar at the bottom."""
    h, w = images[0].shape[:2]
    cell = (w * scale, h * scale)
    header, caption = 18, 16 if captions else 0
    names = ["image", *heats]
    bar = colour_bar(min(len(names) * cell[0], 420), "every map, " + MAP_SCALE)
    sheet = Image.new("RGB", (len(names) * cell[0], header + len(images) * (cell[1] + caption) + bar.height + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        draw.text((c * cell[0] + 3, 2), name[: cell[0] // 7], fill="black", font=_FONT)
    for r, image in enumerate(images):
        top = header + r * (cell[1] + caption)
        sheet.paste(Image.fromarray(image, "RGB").resize(cell, Image.NEAREST), (0, top))
        for c, name in enumerate(heats, 1):
            sheet.paste(overlay(image, heats[name][r]).resize(cell, Image.NEAREST), (c * cell[0], top))
        if captions:
            draw.text((3, top + cell[1] + 1), captions[r][: len(names) * cell[0] // 6], fill="black", font=_SMALL)
    sheet.paste(bar, (0, header + len(images) * (cell[1] + caption) + 2))
    return sheet


def heatmap_scale(grid: np.ndarray) -> tuple[str, float, float]:
    """(colour map, vmin, vmax) for a heat map of ``grid``: sequential from 0 where no value is negative, diverging
    and symmetric about 0 otherwise."""
    finite = grid[np.isfinite(grid)]
    limit = max(1e-6, float(np.abs(finite).max())) if finite.size else 1.0
    if finite.size and finite.min() < 0:
        return DIVERGING, -limit, limit
    return SEQUENTIAL, 0.0, limit


def labelled_heatmap(values: torch.Tensor, columns: list[str], title: str, xlabel: str, label: str = "effect") -> bytes:
    """A labelled heat map (layers x columns) of probing effects, as PNG bytes: a sequential colour map from 0 for
    values that are never negative, a diverging one centred on 0 (white) for signed ones; the colour bar says
    ``label``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = values.float().numpy()
    cmap, vmin, vmax = heatmap_scale(grid)
    signed = vmin < 0
    figure, axes = plt.subplots(figsize=(max(4.0, 0.45 * len(columns) + 2), max(2.5, 0.45 * grid.shape[0] + 1.5)))
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    step = max(1, len(columns) // 24)
    axes.set_xticks(range(0, len(columns), step), [columns[i] for i in range(0, len(columns), step)], rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(grid.shape[0]), [str(i) for i in range(grid.shape[0])])
    axes.set_xlabel(xlabel)
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=8)
    figure.colorbar(image, ax=axes).set_label(label + (" (signed, 0 white)" if signed else " (from 0)"), fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def tile_figures(tiles: list[tuple[str, Image.Image]], columns: int, scale: str | None = None) -> Image.Image:
    """Labelled tiles in rows of ``columns`` (each label above its tile), with a colour bar saying ``scale`` below."""
    width, height = max(t.width for _, t in tiles), max(t.height for _, t in tiles) + 16
    rows = (len(tiles) + columns - 1) // columns
    bar = colour_bar(min(columns * width, 480), scale) if scale else None
    sheet = Image.new("RGB", (columns * width, rows * height + (bar.height + 4 if bar else 0)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, tile) in enumerate(tiles):
        x, y = (i % columns) * width, (i // columns) * height
        sheet.paste(tile, (x, y + 16))
        draw.text((x + 2, y + 2), label[: width // 5], fill="black", font=_SMALL)
    if bar:
        sheet.paste(bar, (0, rows * height + 2))
    return sheet



def image_token_effect_figure(rows: list[tuple[str, Image.Image, torch.Tensor]], title: str) -> bytes:
    """One row per (title, picture, (layers, grid rows, grid cols) effects): the picture under each layer's effect of
    patching each image token (the token's cell of the grid), one colour scale for the whole figure (diverging and
    centred on 0 for signed effects), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = max(maps.shape[0] for _, _, maps in rows)
    cmap, vmin, vmax = heatmap_scale(np.concatenate([maps.float().numpy().ravel() for _, _, maps in rows]))
    figure, axes = plt.subplots(len(rows), layers, figsize=(1.9 * layers + 1.2, 2.1 * len(rows) + 0.6), squeeze=False)
    shown = None
    for r, (label, picture, maps) in enumerate(rows):
        pixels = np.asarray(picture.convert("RGB"))
        height, width = pixels.shape[:2]
        for layer in range(layers):
            ax = axes[r, layer]
            ax.set_xticks([])
            ax.set_yticks([])
            if layer >= maps.shape[0]:
                ax.set_axis_off()
                continue
            ax.imshow(pixels)
            shown = ax.imshow(np.ma.masked_invalid(maps[layer].float().numpy()), cmap=cmap, vmin=vmin, vmax=vmax,
                              alpha=0.6, extent=(0, width, height, 0), interpolation="nearest")
            ax.set_title(f"layer {layer}", fontsize=7)
        axes[r, 0].set_ylabel(label[:48], fontsize=6)
    signed = vmin < 0
    figure.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02).set_label(
        "effect" + (" (signed, 0 white)" if signed else " (from 0)"), fontsize=7)
    figure.suptitle(title, fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
