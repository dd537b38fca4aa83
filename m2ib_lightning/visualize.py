"""Every figure of the project: heat-map overlays and coloured tokens (Pillow), and labelled layer x head / position
heat maps of probing effects (matplotlib)."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import torch
from torch import Tensor

from .backbones.base import clean_token
from .engine import image_maps_from_capacity, minmax

_FONT = ImageFont.load_default()


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 along a blue-cyan-yellow-red ramp (NaN, a map a method lacks, as 0)."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    position = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with the heat map blended on top, both (H, W[, 3])."""
    blended = image.astype(np.float32) * (1 - alpha) + heat_colours(heat).astype(np.float32) * alpha
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


def text_strip(tokens: list[str], weights: list[float], width: int) -> Image.Image:
    """Tokens on a white strip, each on a red background as strong as its weight, wrapped to ``width``."""
    pad, line = 4, 14
    boxes, x, y = [], pad, pad
    for token, weight in zip(tokens, weights):
        w = int(_FONT.getlength(token)) + 2 * pad
        if x + w > width and x > pad:
            x, y = pad, y + line + pad
        boxes.append((token, weight, x, y, w))
        x += w + 2
    strip = Image.new("RGB", (width, y + line + 2 * pad), "white")
    draw = ImageDraw.Draw(strip)
    for token, weight, x, y, w in boxes:
        shade = int(255 * (1 - float(np.clip(weight, 0, 1))))
        draw.rectangle((x, y, x + w - 2, y + line), fill=(255, shade, shade))
        draw.text((x + pad, y + 1), token, fill="black", font=_FONT)
    return strip


def pair_figure(image: np.ndarray, heat: np.ndarray, tokens: list[str], weights: list[float], scale: int = 3,
                footer: str | None = None) -> Image.Image:
    """Image, its overlay side by side, the coloured caption (or question) below, and ``footer`` (the answer) last."""
    from PIL import ImageDraw

    h, w = image.shape[:2]
    size = (w * scale, h * scale)
    left = Image.fromarray(image, "RGB").resize(size, Image.NEAREST)
    right = overlay(image, heat).resize(size, Image.NEAREST)
    strip = text_strip(tokens, weights, 2 * size[0])
    footer_height = 16 if footer else 0
    figure = Image.new("RGB", (2 * size[0], size[1] + strip.height + footer_height), "white")
    figure.paste(left, (0, 0))
    figure.paste(right, (size[0], 0))
    figure.paste(strip, (0, size[1]))
    if footer:
        ImageDraw.Draw(figure).text((4, size[1] + strip.height + 2), footer, fill="black")
    return figure


def display_text(tokens: list[str], special: list[bool], weights: Tensor) -> tuple[list[str], list[float]]:
    """The text map as the official plots show it: special tokens (BOS/EOS/CLS/SEP/padding) left out, markers
    (``</w>``, ``##``) stripped, and the remaining weights min-maxed again."""
    keep = [i for i, is_special in enumerate(special) if not is_special]
    if not keep:
        return [], []
    kept = minmax(weights[keep][None].float())[0]
    return [clean_token(tokens[i]) for i in keep], kept.tolist()


def prediction_figure(prediction: dict, row: int, display_image: Callable[[Tensor], np.ndarray]) -> Image.Image:
    """The pair figure of one row of an ``M2IBModule`` (or ``AnswerM2IBModule``) ``predict_step`` output, with the
    answer printed for a question; ``display_image`` is the adapter's."""
    capacity, length = prediction["image_capacity"][row], int(prediction["lengths"][row])
    heat = image_maps_from_capacity(capacity.flatten()[None], tuple(capacity.shape), prediction["image_size"])[0]
    image = display_image(prediction["pixel_values"][row])
    tokens, weights = display_text(
        prediction["tokens"][row][:length], prediction["special"][row][:length], prediction["text_maps"][row, :length]
    )
    answer = prediction["answer"][row] if "answer" in prediction else None
    footer = None if answer is None else f"answer ({prediction['answer_source'][row]}): {answer}"
    return pair_figure(image, heat.numpy(), tokens, weights, footer=footer)


def grid(figures: list[Image.Image], columns: int = 4) -> Image.Image:
    """Figures tiled in rows of ``columns``."""
    width = max(f.width for f in figures)
    height = max(f.height for f in figures)
    rows = (len(figures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, figure in enumerate(figures):
        sheet.paste(figure, ((i % columns) * width, (i // columns) * height))
    return sheet


def method_grid(images: list[np.ndarray], heats: dict[str, list[np.ndarray]], scale: int = 3) -> Image.Image:
    """One row per sample: the image, then each method's map over it; method names on top."""
    from PIL import ImageDraw

    h, w = images[0].shape[:2]
    cell = (w * scale, h * scale)
    header = 14
    names = ["image", *heats]
    sheet = Image.new("RGB", (len(names) * cell[0], header + len(images) * cell[1]), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        draw.text((c * cell[0] + 2, 1), name[: cell[0] // 6], fill="black")
    for r, image in enumerate(images):
        top = header + r * cell[1]
        sheet.paste(Image.fromarray(image, "RGB").resize(cell, Image.NEAREST), (0, top))
        for c, name in enumerate(heats, 1):
            sheet.paste(overlay(image, heats[name][r]).resize(cell, Image.NEAREST), (c * cell[0], top))
    return sheet


def labelled_heatmap(values: torch.Tensor, columns: list[str], title: str, xlabel: str) -> bytes:
    """A labelled heat map (layers x columns, 0 white, symmetric colour bar) of probing effects, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = values.float().numpy()
    limit = max(1e-6, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0  # symmetric: 0 is white
    figure, axes = plt.subplots(figsize=(max(4.0, 0.45 * len(columns) + 2), max(2.5, 0.45 * grid.shape[0] + 1.5)))
    image = axes.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    step = max(1, len(columns) // 24)
    axes.set_xticks(range(0, len(columns), step), [columns[i] for i in range(0, len(columns), step)], rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(grid.shape[0]), [str(i) for i in range(grid.shape[0])])
    axes.set_xlabel(xlabel)
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=8)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
