"""The Lightning shell around the engines: one M2IB fit per predict batch, of pairs or of questions.

Use with ``Trainer(inference_mode=False)``: ``predict_step`` needs gradients.
Predict does not wrap the module in DistributedDataParallel, so per-sample
masks are never averaged across ranks; each rank fits its own shard.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import lightning as L
import torch

from ..amortised.answers import AmortisedAnswerM2IB
from ..amortised.explainer import AmortisedM2IB
from ..amortised.fidelity import map_agreement, masked_agreement
from ..answers import answer_fields, attribute_answers, complete_answers, unanswerable
from ..engine import M2IB, M2IBConfig


class M2IBModule(L.LightningModule):
    """Fits M2IB for every pair of a batch; the backbone (a model or an adapter) is injected and frozen.

    ``explainer``: None fits every sample exactly; an amortised explainer (a directory, ``builtin:NAME`` or an
    :class:`~m2ib_lightning.amortised.ExplainerNetwork`) predicts the maps in one forward pass instead, and with
    ``audit_every`` N every N-th sample (by a hash of its id: the same ones on any topology) is also fitted
    exactly and the prediction's ``audit`` holds how well the two agree.
    A sample the engine would refuse (non-finite pixels, no end-of-text token,
    too long) is reported in ``failures`` and the rest of its batch is attributed.
    """

    def __init__(self, backbone: Any, m2ib: M2IBConfig | None = None, *, adapter: str = "auto", explainer: Any = None,
                 audit_every: int = 0):
        super().__init__()
        config = m2ib or M2IBConfig()
        self.exact = M2IB(backbone, config, adapter=adapter)
        self.explainer = self.exact if explainer is None else AmortisedM2IB(self.exact.backbone, explainer, m2ib=config)
        if audit_every and explainer is None:
            raise ValueError("audit_every: an audit compares an amortised explainer with the exact fit; give an explainer")
        self.audit_every = audit_every
        self.model = self.exact.backbone.module  # registered, so that Lightning moves it to the device
        if explainer is not None:
            self.network = self.explainer.network  # ... and the explainer's network with it
        self.save_hyperparameters({"m2ib": vars(config), "explainer": None if explainer is None else _explainer_name(explainer),
                                   "audit_every": audit_every})
        self.last_batch_seconds = 0.0

    @property
    def backbone(self) -> Any:
        return self.explainer.backbone

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        failures = list(batch["failures"])
        if not batch["id"]:  # every record of this batch failed to load
            return {"id": [], "failures": failures}
        reasons = self.explainer.screen(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        keep = kept(batch, reasons, failures)
        if not keep:
            return {"id": [], "failures": failures}
        rows = torch.tensor(keep, device=batch["input_ids"].device)
        mask = batch["attention_mask"][rows]
        width = int(mask.sum(1).max())  # padding no kept sample needs is cut
        start = time.perf_counter()
        with torch.enable_grad():
            result = self.explainer.attribute(
                batch["pixel_values"][rows], batch["input_ids"][rows, :width], mask[:, :width], seed=batch["seed"][rows.cpu()]
            )
        self.last_batch_seconds = time.perf_counter() - start
        fields = {
            "pixel_values": batch["pixel_values"][rows],
            "image_size": tuple(batch["pixel_values"].shape[-2:]),
            "patch_grid": result.patch_grid,
            **maps_of(result),
            "lengths": mask.sum(1),
            "curves": {k: v.detach().cpu() for k, v in result.curves.items()},
        }
        audited = [r for r, b in enumerate(keep) if self.audit_every and audited_sample(batch["id"][b], self.audit_every)]
        if audited:
            fields["audit"] = self._audit(batch, [keep[r] for r in audited], result, audited, width)
        return prediction_of(batch, keep, failures, fields)

    def _audit(self, batch: dict[str, Any], batch_rows: list[int], predicted: Any, result_rows: list[int], width: int
               ) -> dict[str, Any]:
        """The exact fit of the audited samples (``batch_rows`` of the batch, ``result_rows`` of the amortised
        result), and per sample its agreement with the amortised maps."""
        index = torch.tensor(batch_rows, device=batch["input_ids"].device)
        mask = batch["attention_mask"][index, :width]
        with torch.enable_grad():
            exact = self.exact.attribute(batch["pixel_values"][index], batch["input_ids"][index, :width], mask,
                                         seed=batch["seed"][index.cpu()])
        picked = torch.tensor(result_rows)
        agreement = map_agreement(predicted.image_patch_capacity[picked].flatten(1).cpu(),
                                  exact.image_patch_capacity.flatten(1).cpu(), predicted.text_capacity[picked].cpu(),
                                  exact.text_capacity.cpu(), mask.sum(1).cpu())
        return {"rows": result_rows, **agreement}


class AnswerM2IBModule(L.LightningModule):
    """Fits M2IB for answers for every question of a batch; the answer adapter is injected and its model frozen.

    A question without an answer gets the model's own greedy one (up to ``max_new_tokens``), recorded with
    ``answer_source: generate``. A sample with non-finite pixels, or whose greedy answer is empty, is reported in
    ``failures`` and the rest of its batch is attributed. The prediction has the keys of
    :class:`M2IBModule`'s (so the writer, the summary and TensorBoard serve both) plus the answers.
    """

    def __init__(self, backbone: Any, m2ib: M2IBConfig | None = None, *, max_new_tokens: int = 16, explainer: Any = None,
                 audit_every: int = 0):
        super().__init__()
        if audit_every and explainer is None:
            raise ValueError("audit_every: an audit compares an amortised explainer with the exact fit; give an explainer")
        self.backbone = backbone
        self.model = backbone.module  # registered, so that Lightning moves it to the device
        self.config = m2ib or M2IBConfig()
        self.amortised = None if explainer is None else AmortisedAnswerM2IB(backbone, explainer, m2ib=self.config)
        if self.amortised is not None:
            self.network = self.amortised.network  # ... and the explainer's network with it
        self.max_new_tokens, self.audit_every = max_new_tokens, audit_every
        self.save_hyperparameters({"m2ib": vars(self.config), "max_new_tokens": max_new_tokens,
                                   "explainer": None if explainer is None else _explainer_name(explainer),
                                   "audit_every": audit_every})
        self.last_batch_seconds = 0.0

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        failures = list(batch["failures"])
        if not batch["id"]:
            return {"id": [], "failures": failures}
        backbone, items, pixels = self.backbone, batch["image_items"], batch["pictures"]
        answers, answer_mask = complete_answers(backbone, items, batch["input_ids"], batch["attention_mask"],
                                                batch["answer_ids"], batch["answer_mask"], batch["answer_given"],
                                                self.max_new_tokens)
        keep = kept(batch, unanswerable(pixels, answer_mask), failures)
        if not keep:
            return {"id": [], "failures": failures}
        rows = torch.tensor(keep, device=batch["input_ids"].device)
        mask = batch["attention_mask"][rows]
        width = int(mask.sum(1).max())
        longest = int(answer_mask[rows].sum(1).max())
        answers, answer_mask = answers[rows, :longest], answer_mask[rows, :longest]
        joined = backbone.join_inputs([items[b] for b in keep])  # the kept samples' image inputs (packed ones too)
        pixel_values, input_ids, mask = joined.pop("pixel_values"), batch["input_ids"][rows, :width], mask[:, :width]
        seeds = batch["seed"][rows.cpu()]
        start = time.perf_counter()
        if self.amortised is not None:
            result = self.amortised.attribute(pixel_values, input_ids, mask, answers, answer_mask, **joined)
        else:
            with torch.enable_grad():
                result = attribute_answers(backbone, pixel_values, input_ids, mask, answers, answer_mask, config=self.config,
                                           seed=seeds, **joined)
        self.last_batch_seconds = time.perf_counter() - start
        audited = [r for r, b in enumerate(keep) if self.audit_every and audited_sample(batch["id"][b], self.audit_every)]
        fields = {"audit": self._audit(result, audited, [items[b] for b in keep], input_ids, mask, answers, answer_mask, seeds)
                  } if audited else {}
        return prediction_of(batch, keep, failures, {
            **fields,
            **answer_fields(backbone, answers, answer_mask, [bool(batch["answer_given"][b]) for b in keep]),
            "pixel_values": torch.stack([pixels[b] for b in keep]),
            "image_size": tuple(int(v) for v in result.image_sizes[0]),
            "patch_grid": tuple(result.image_patch_capacity.shape[-2:]),
            **maps_of(result),
            "lengths": mask.sum(1),
            "curves": {},
        })

    def _audit(self, predicted: Any, rows: list[int], images: list[dict[str, Any]], input_ids: Any, mask: Any, answers: Any,
               answer_mask: Any, seeds: Any) -> dict[str, Any]:
        """The exact fit of the audited ``rows`` of the kept samples (``images``: their image inputs), and per sample
        its agreement with the amortised maps (image on each picture's patch grid, text over the question's words)."""
        index = torch.tensor(rows, device=input_ids.device)
        joined = {k: v.to(input_ids.device) for k, v in self.backbone.join_inputs([images[r] for r in rows]).items()}
        with torch.enable_grad():
            exact = attribute_answers(self.backbone, joined.pop("pixel_values"), input_ids[index], mask[index], answers[index],
                                      answer_mask[index], config=self.config, seed=seeds[index.cpu()], **joined)
        picked = index.cpu()
        exact_grid, predicted_grid = exact.image_patch_capacity.flatten(1).cpu(), predicted.image_patch_capacity[picked].flatten(1).cpu()
        agreement = masked_agreement(predicted_grid, exact_grid, torch.ones_like(exact_grid, dtype=torch.bool),  # a batch: one grid
                                     predicted.text_capacity[picked].cpu(), exact.text_capacity.cpu(), exact.text_positions.cpu())
        return {"rows": rows, **agreement}


def _explainer_name(explainer: Any) -> str:
    """What the hyperparameters record of an explainer: its path or name, else its type."""
    return str(explainer) if isinstance(explainer, (str, os.PathLike)) else type(explainer).__name__


def audited_sample(sample_id: str, every: int) -> bool:
    """Whether an audited run also fits this sample exactly: one in ``every``, by a hash of its id."""
    digest = hashlib.sha256(f"audit\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % every == 0


def kept(batch: dict[str, Any], reasons: list[str | None], failures: list[dict]) -> list[int]:
    """The rows without a reason to refuse them; each refused one is reported in ``failures``."""
    failures += [{"id": batch["id"][b], "reason": r, "severity": "error"} for b, r in enumerate(reasons) if r]
    return [b for b, r in enumerate(reasons) if r is None]


def maps_of(result: Any) -> dict[str, Any]:
    """The maps and fit values of an M2IB result (of pairs or of answers), under the prediction's names."""
    return {"image_capacity": result.image_patch_capacity, "image_token_capacity": result.image_capacity,
            "text_capacity": result.text_capacity, "text_maps": result.text_maps, "image_fit": result.image_fit,
            "text_fit": result.text_fit}


def prediction_of(batch: dict[str, Any], keep: list[int], failures: list[dict], fields: dict[str, Any]) -> dict[str, Any]:
    """What both modules return for the writer, the summary and TensorBoard: the kept samples' own fields from the
    batch, ``fields`` (maps and fits, on the CPU) and their ground truth where the batch has it."""
    prediction = {"failures": failures, **{key: [batch[key][b] for b in keep] for key in ("id", "text", "tokens", "special", "geometry")},
                  **{k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}}
    if "target_mask" in batch:
        rows = torch.tensor(keep)
        prediction["target_mask"] = batch["target_mask"][rows.to(batch["target_mask"].device)].cpu()
        prediction["has_target"] = batch["has_target"][rows].cpu()
        prediction["target_class"] = [batch["target_class"][b] for b in keep]
    return prediction
