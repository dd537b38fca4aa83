"""The evaluation run's LightningModule: every method on every predict batch, scored, with synced torchmetrics
states."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric

from ..answers import answer_fields, complete_answers, unanswerable
from ..baselines import AnswerScorer, AttributionMethod, Maps
from ..engine import screen
from ..metrics import METRICS, PointingGame
from ..metrics.mean import standard_error
from ..metrics.settings import MetricSettings
from ..evaluation import CLASS_MEAN, LOCALISATION, Evaluator, metric_of


class EvaluationModule(L.LightningModule):
    """Every method on every predict batch, scored; the backbone and the methods are injected.

    Returns per-sample maps and metric values for the writer, and keeps one torchmetrics
    metric per (method, metric) plus seconds and sample counts per method, synced at the end.
    """

    def __init__(self, backbone: Any, methods: dict[str, AttributionMethod], settings: MetricSettings = MetricSettings(),
                 max_new_tokens: int = 16):
        super().__init__()
        self.max_new_tokens = max_new_tokens  # questions without an answer: the model's own, up to this long
        self.methods, self.evaluator = methods, Evaluator(backbone, settings)
        self.model = self.evaluator.scorer.backbone.module  # registered, so that Lightning moves it to the device
        self.metrics = nn.ModuleDict({method: nn.ModuleDict({name: metric_of(name, settings) for name in METRICS})
                                      for method in methods})
        self.seconds = nn.ModuleDict({method: SumMetric() for method in methods})
        self.samples = nn.ModuleDict({method: SumMetric() for method in methods})
        self.save_hyperparameters({"methods": list(methods), "metrics": vars(settings)})
        self.table: dict[str, dict[str, Any]] = {}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        scorer = self.evaluator.scorer
        if batch["id"]:  # samples the model refuses are reported, the rest of the batch is scored
            if isinstance(scorer, AnswerScorer):  # the joined pixel values (maybe packed) give way to the pictures
                batch = self._answered({k: v for k, v in batch.items() if k != "pixel_values"})
            reasons = self._screen(batch)
            failures = [{"id": batch["id"][b], "reason": r, "severity": "error"} for b, r in enumerate(reasons) if r]
            batch = _rows(batch, [b for b, r in enumerate(reasons) if r is None], batch["failures"] + failures)
        if not batch["id"]:
            return {"id": [], "failures": batch["failures"]}
        if "pictures" in batch:  # questions: the (B, C, H, W) pictures the metrics perturb (packed by the adapter)
            batch["pixel_values"] = torch.stack(batch["pictures"])
        answers = (batch["answer_ids"], batch["answer_mask"]) if isinstance(scorer, AnswerScorer) else None
        if answers is not None:
            answers = tuple(a[:, :int(batch["answer_mask"].sum(1).max())] for a in answers)
            scorer.bind(*answers)
        batch = self._classes(batch)
        px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        width = int(mask.sum(1).max())
        batch = {**batch, "input_ids": ids[:, :width], "attention_mask": mask[:, :width]}
        special = torch.tensor([row[:width] + [True] * (width - len(row[:width])) for row in batch["special"]], device=ids.device)
        words = batch["attention_mask"].bool() & ~special
        clean = self.evaluator.scorer.clean(px, batch["input_ids"], batch["attention_mask"])
        maps, values, seconds = {}, {}, {}
        for name, method in self.methods.items():
            start = time.perf_counter()
            with torch.enable_grad():
                maps[name] = method.attribute(px, batch["input_ids"], batch["attention_mask"], batch["seed"], special,
                                              **({} if answers is None else {"answers": answers}), ids=batch["id"])
            seconds[name] = time.perf_counter() - start
            values[name] = self.evaluator.values(maps[name], batch, clean, words)
            # maps made elsewhere may lack a sample: it is reported and left out of that method's metrics
            present = torch.tensor([row not in maps[name].missing for row in range(len(batch["id"]))])
            batch["failures"] = batch["failures"] + [{"id": batch["id"][row], "reason": f"method {name!r}: {why}",
                                                      "severity": "warning"} for row, why in maps[name].missing.items()]
            for metric, per_sample in values[name].items():  # localisation only where there is ground truth;
                if metric not in LOCALISATION:
                    self.metrics[name][metric].update_scores(per_sample[present.to(per_sample.device)])  # NaN shows
                    continue
                applies = (batch["has_target"] & present).to(per_sample.device)
                extra = {"classes": batch["class_index"][applies.cpu()]} if metric == "pointing_game" else {}
                self.metrics[name][metric].update_scores(per_sample[applies], **extra)
            self.seconds[name].update(seconds[name])
            self.samples[name].update(int(present.sum()))
        extra = {} if answers is None else answer_fields(scorer.backbone, *answers, batch["answer_given"].tolist())
        return {
            **extra,
            "id": batch["id"], "failures": batch["failures"], "text": batch["text"], "tokens": batch["tokens"],
            "special": batch["special"], "lengths": batch["attention_mask"].sum(1).cpu(), "pixel_values": px.cpu(),
            "target_class": batch.get("target_class", [None] * len(batch["id"])),
            "maps": {n: Maps(m.image.cpu(), None if m.text is None else m.text.cpu()) for n, m in maps.items()},
            "values": {n: {k: v.cpu() for k, v in vals.items()} for n, vals in values.items()},
            "seconds": seconds,
        }

    def _answered(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A question batch with every answer: the given ones, the model's own for the others."""
        answers, mask = complete_answers(self.evaluator.scorer.backbone, batch["image_items"], batch["input_ids"],
                                         batch["attention_mask"], batch["answer_ids"], batch["answer_mask"],
                                         batch["answer_given"], self.max_new_tokens)
        return {**batch, "answer_ids": answers, "answer_mask": mask}

    def _screen(self, batch: dict[str, Any]) -> list[str | None]:
        """Why each sample cannot be scored (None: it can): the engine's refusals, or, for questions, non-finite
        pixels and empty answers."""
        if not isinstance(self.evaluator.scorer, AnswerScorer):
            return screen(self.evaluator.scorer.backbone, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return unanswerable(batch["pictures"], batch["answer_mask"])

    def _classes(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``class_index`` per sample; a class outside ``metrics.classes`` is reported and left out of the class mean."""
        names = list(batch.get("target_class", [None] * len(batch["id"])))
        known = set(self.evaluator.settings.classes or ())
        reports = []
        for row, name in enumerate(names):
            if name is not None and known and name not in known:
                reports.append({"id": batch["id"][row], "severity": "warning",
                                 "reason": f"class {name!r} is not one of metrics.classes; left out of the class mean"})
                names[row] = None
        index = torch.tensor([self.evaluator.settings.class_index(n) for n in names], dtype=torch.long)
        return {**batch, "target_class": names, "class_index": index, "failures": batch["failures"] + reports}

    def on_predict_end(self) -> None:
        self.table = self.results()  # every rank: the sync is collective

    def results(self) -> dict[str, dict[str, Any]]:
        """Per method: each metric's (mean, standard error) (the metric None where it does not apply; a NaN mean,
    from a method's NaN scores, and the standard error of fewer than 2 samples are None), samples and samples/s.

        Syncs across processes: call it on every rank.
        """
        table = {}
        for method, metrics in self.metrics.items():
            row: dict[str, Any] = {}
            for name, metric in metrics.items():
                if metric.samples() == 0:
                    row[name] = None
                else:  # NaN (a method's broken score, or the error of one sample) as None: JSON has no NaN
                    row[name] = _pair(metric.compute(), metric.standard_error())
            row[CLASS_MEAN] = _class_mean(metrics["pointing_game"])
            seconds, samples = self.seconds[method].compute().item(), self.samples[method].compute().item()
            row["samples"] = int(samples)
            row["samples_per_s"] = samples / seconds if seconds > 0 else None
            table[method] = row
        return table


def _pair(mean: Tensor, error: Tensor) -> tuple[float | None, float | None]:
    return tuple(None if math.isnan(v) else v for v in (mean.item(), error.item()))


def _class_mean(metric: PointingGame) -> tuple[float | None, float | None] | None:
    """(mean over classes of their hit rates, its standard error over classes); None without classes."""
    if metric.num_classes is None:
        return None
    rates = metric.class_rates().double()
    rates = rates[~rates.isnan()]
    if rates.numel() == 0:
        return None
    return _pair(rates.mean(), standard_error(rates.sum(), (rates * rates).sum(), torch.tensor(rates.numel())))


def _rows(batch: dict[str, Any], keep: list[int], failures: list[dict]) -> dict[str, Any]:
    """The batch cut to the samples ``keep`` (per-sample lists and tensors alike), with ``failures``."""
    index = torch.tensor(keep, dtype=torch.long)
    out: dict[str, Any] = {"failures": failures}
    for key, value in batch.items():
        if key == "failures":
            continue
        out[key] = value[index.to(value.device)] if isinstance(value, Tensor) else [value[i] for i in keep]
    return out
