"""The Lightning shell around the engine: one M2IB fit per predict batch.

Use with ``Trainer(inference_mode=False)``: ``predict_step`` needs gradients.
Predict does not wrap the module in DistributedDataParallel, so per-sample
masks are never averaged across ranks; each rank fits its own shard.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from .engine import M2IB, M2IBConfig


class M2IBModule(L.LightningModule):
    """Fits M2IB for every pair of a batch; the backbone is injected and frozen."""

    def __init__(self, model: Any, m2ib: M2IBConfig | None = None):
        super().__init__()
        self.explainer = M2IB(model, m2ib or M2IBConfig())
        self.model = self.explainer.backbone.module  # registered, so that Lightning moves it to the device
        self.save_hyperparameters({"m2ib": vars(self.explainer.config)})
        self.last_batch_seconds = 0.0

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if not batch["id"]:  # every record of this batch failed to load
            return {"id": [], "failures": batch["failures"]}
        start = time.perf_counter()
        with torch.enable_grad():
            result = self.explainer.attribute(
                batch["pixel_values"], batch["input_ids"], batch["attention_mask"], seed=batch["seed"]
            )
        self.last_batch_seconds = time.perf_counter() - start
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        return {
            "failures": batch["failures"],
            "id": batch["id"],
            "text": batch["text"],
            "tokens": batch["tokens"],
            "image_size": tuple(batch["pixel_values"].shape[-2:]),
            "patch_grid": result.patch_grid,
            "image_capacity": cpu(result.image_patch_capacity),
            "text_capacity": cpu(result.text_capacity),
            "text_maps": cpu(result.text_maps),
            "lengths": cpu(batch["attention_mask"].sum(1)),
            "image_fit": cpu(result.image_fit),
            "text_fit": cpu(result.text_fit),
            "curves": {k: cpu(v) for k, v in result.curves.items()},
        }
