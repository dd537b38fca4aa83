"""Export of an evaluation run: every method's maps in rolling shards, per-sample metric values in the index,
and the first samples kept for the side-by-side picture grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .attribution_writer import RollingShardWriter


def _number(value: torch.Tensor) -> float | None:
    """A metric value for JSON: None where it does not apply to the sample (no ground truth)."""
    number = float(value)
    return None if math.isnan(number) else number


class EvaluationWriter(RollingShardWriter):
    """Per sample: ``METHOD/image`` (H, W) and ``METHOD/text`` (length,) maps in the shard; the index line holds
    id, text, tokens, the metric values of each method and its seconds per sample (so a resumed run's table
    counts the samples of earlier runs). Rank 0 keeps its first ``grid_samples`` images and maps for the grid."""

    def __init__(self, output_dir: str | Path, *, samples_per_shard: int = 1024, shard_seconds: float = 300.0,
                 grid_samples: int = 8, display_image: Callable | None = None, run_token: str | None = None):
        super().__init__(output_dir, samples_per_shard=samples_per_shard, shard_seconds=shard_seconds, run_token=run_token)
        self.grid_samples = grid_samples if display_image is not None else 0
        self.display_image = display_image
        self.grid_images: list[np.ndarray] = []
        self.grid_maps: dict[str, list[np.ndarray]] = {}
        self.grid_captions: list[str] = []

    def samples(self, prediction: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        out = []
        count = len(prediction["id"])
        for row, sample_id in enumerate(prediction["id"]):
            length = int(prediction["lengths"][row])
            entry = {
                "id": sample_id,
                "text": prediction["text"][row],
                "tokens": prediction["tokens"][row][:length],
                "special": prediction["special"][row][:length],
                "length": length,
                "values": {m: {k: _number(v[row]) for k, v in vals.items()} for m, vals in prediction["values"].items()},
                "seconds": {m: s / count for m, s in prediction["seconds"].items()},
            }
            if "answer" in prediction:  # an evaluation on answers: the answer every method explained
                entry["answer"], entry["answer_source"] = prediction["answer"][row], prediction["answer_source"][row]
            if prediction["target_class"][row] is not None:  # a resumed table's class mean counts it again
                entry["class"] = prediction["target_class"][row]
            tensors = {}
            for method, maps in prediction["maps"].items():
                tensors[f"{method}/image"] = maps.image[row].float()
                if maps.text is not None:
                    tensors[f"{method}/text"] = maps.text[row, :length].float()
            out.append((entry, tensors))
            if self.rank == 0 and len(self.grid_images) < self.grid_samples:
                self.grid_images.append(self.display_image(prediction["pixel_values"][row]))
                answer = f" -> {prediction['answer'][row]}" if "answer" in prediction else ""
                self.grid_captions.append(f"{sample_id}: {prediction['text'][row]}{answer}")
                for method, maps in prediction["maps"].items():
                    self.grid_maps.setdefault(method, []).append(maps.image[row].numpy())
        return out
