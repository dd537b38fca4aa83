"""Where to fit: M2IB over a grid of ``vision_layer`` x ``text_layer`` x ``beta`` on the same pairs, each cell an
evaluation run of its own (``OUTPUT_DIR/cells/...``: predict, DDP, resumable, refused on other settings like any
run), scored against the random baseline; a table, a figure per metric family, and the best setting per metric.

In a dual encoder the image map depends on ``vision_layer`` and ``beta`` only, the text map on ``text_layer`` and
``beta`` only: sweep one tower's layers with the other's fixed to halve the work.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from ..evaluation import COLUMNS, column_label, higher_is_better
from ..results import atomic_write
from . import evaluate
from .evaluate import EvaluateConfig

IMAGE_COLUMNS = ("image_confidence_drop", "image_confidence_increase", "image_deletion_auc", "image_insertion_auc",
                 "pointing_game", "pointing_game_class_mean", "energy", "top_k_iou")


# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class SweepGrid:
    vision_layer: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    text_layer: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    beta: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])


@dataclass
class SweepConfig(EvaluateConfig):
    task: str = "sweep"
    output_dir: str = "runs/sweep_shapes"
    methods: List[str] = field(default_factory=lambda: ["m2ib"])  # in every cell; the random baseline runs once
    sweep: SweepGrid = field(default_factory=SweepGrid)


#: this module's tasks and their schemas
SCHEMAS = {"sweep": SweepConfig}


def cell_name(vision_layer: int, text_layer: int, beta: float) -> str:
    return f"vision{vision_layer}-text{text_layer}-beta{beta:g}"


def cells(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, m2ib settings) of every cell of the grid, in grid order."""
    grid = cfg.sweep
    return [(cell_name(v, t, b), {"vision_layer": v, "text_layer": t, "beta": float(b)})
            for v, t, b in itertools.product(grid.vision_layer, grid.text_layer, grid.beta)]


def _cell_config(cfg: DictConfig, out: Path, name: str, m2ib: dict[str, Any], methods: list[str]) -> DictConfig:
    cell = OmegaConf.to_container(cfg, resolve=True)
    del cell["sweep"]
    cell.update(task="evaluate", output_dir=str(out / "cells" / name), methods=methods)
    cell["m2ib"].update(m2ib)
    cell["export"]["grid_samples"] = 0
    return OmegaConf.create(cell)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Every cell (an evaluation run; a done cell is resumed, which skips all its pairs), then the table."""
    out = Path(cfg.output_dir)
    rows: dict[str, dict[str, Any]] = {}
    random_summary = evaluate.run(_cell_config(cfg, out, "random", {}, ["random"]))
    for name, m2ib in cells(cfg):
        summary = evaluate.run(_cell_config(cfg, out, name, m2ib, list(cfg.methods)))
        if summary:  # rank 0
            rows[name] = {"settings": m2ib, **summary["methods"]["m2ib"]}
    if not random_summary:
        return {}
    random = random_summary["methods"]["random"]
    result = {"pairs": random_summary["pairs"], "random": random, "cells": rows,
              "best": best_cells(rows), "beats_random": beats_random(rows, random),
              "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write(out / "sweep.json", json.dumps(result, indent=2))
    atomic_write(out / "results.md", table(rows, random, result["best"]))
    sweep_figures(out / "figures", cfg, rows, random)
    print(f"\nM2IB sweep over {len(rows)} settings on {result['pairs']} pairs: {out}/results.md\n")
    print(table(rows, random, result["best"]))
    return result


def _columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    return [c for c in COLUMNS if c in next(iter(rows.values()), {}) and any(r[c] is not None for r in rows.values())]


def best_cells(rows: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per metric, the cell with the best mean (in the metric's direction)."""
    best = {}
    for column in _columns(rows):
        scored = [(r[column][0], name) for name, r in rows.items() if r[column] is not None and r[column][0] is not None]
        if scored:
            best[column] = (max if higher_is_better(column) else min)(scored)[1]
    return best


def beats_random(rows: dict[str, dict[str, Any]], random: dict[str, Any]) -> dict[str, list[str]]:
    """Per metric, the cells better than the random baseline by more than 2 standard errors of the difference."""
    out = {}
    for column in _columns(rows):
        if random.get(column) is None or random[column][0] is None:
            continue
        low, error = random[column]
        sign = 1 if higher_is_better(column) else -1
        out[column] = [name for name, r in rows.items() if r[column] is not None and r[column][0] is not None
                       and sign * (r[column][0] - low) > 2 * math.hypot(r[column][1] or 0.0, error or 0.0)]
    return out


def table(rows: dict[str, dict[str, Any]], random: dict[str, Any], best: dict[str, str]) -> str:
    columns = _columns(rows)
    cell = lambda v: "–" if v is None or v[0] is None else f"{v[0]:.3f} ± {(v[1] or 0):.3f}"  # noqa: E731
    lines = ["| setting | " + " | ".join(f"{column_label(c)} {'↑' if higher_is_better(c) else '↓'}" for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(("**" + cell(row[c]) + "**") if best.get(c) == name else cell(row[c])
                                                 for c in columns) + " |")
    lines.append("| random | " + " | ".join(cell(random.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def sweep_figures(folder: Path, cfg: DictConfig, rows: dict[str, dict[str, Any]], random: dict[str, Any]) -> None:
    """The paper's ablation: each metric against its tower's layer, one line per beta (the other tower's layer at
    its first grid value), the random baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    columns, grid = _columns(rows), cfg.sweep
    for family, picked in (("image", [c for c in columns if c in IMAGE_COLUMNS]), ("text", [c for c in columns if c not in IMAGE_COLUMNS])):
        if not picked:
            continue
        layers = list(grid.vision_layer if family == "image" else grid.text_layer)
        figure, axes = plt.subplots(1, len(picked), figsize=(3.2 * len(picked), 2.8), squeeze=False)
        for ax, column in zip(axes[0], picked):
            for beta in grid.beta:
                names = [cell_name(layer, grid.text_layer[0], beta) if family == "image" else cell_name(grid.vision_layer[0], layer, beta)
                         for layer in layers]
                values = [rows[n][column] or (math.nan, 0.0) for n in names]
                ax.errorbar(layers, [v[0] if v[0] is not None else math.nan for v in values], yerr=[v[1] or 0.0 for v in values],
                            marker="o", capsize=2, label=f"beta {beta:g}")
            if random.get(column) is not None and random[column][0] is not None:
                ax.axhline(random[column][0], color="grey", linestyle="--", label="random")
            ax.set_title(f"{column_label(column)} {'↑' if higher_is_better(column) else '↓'}", fontsize=9)
            ax.set_xlabel(f"{'vision' if family == 'image' else 'text'} layer")
            ax.set_xticks(layers)
        axes[0][0].legend(fontsize=7)
        figure.tight_layout()
        atomic_write(folder / f"sweep_{family}.png", lambda tmp: figure.savefig(tmp, format="png", dpi=110))
        plt.close(figure)
