"""Training the amortised explainer on an exact run: the backbone is injected and frozen, only the explainer's
network learns; validation reports its agreement with the exact maps on held-out ids."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import CatMetric

from ..amortised.answers import answer_features
from ..amortised.explainer import tower_features
from ..amortised.fidelity import AGREEMENT_KEYS, map_agreement, masked_agreement
from ..amortised.network import LOG_EPSILON, ExplainerNetwork
from ..answers import text_by_input_column
from ..backbones import MODALITIES
from ..engine import eval_mode
from .fitting import adamw_with_warmup_cosine


def explainer_loss(predicted: Tensor, capacity: Tensor, token_mask: Tensor, rank_weight: float, sharpness: float) -> Tensor:
    """Squared error of log(capacity + eps) over real tokens, plus ``rank_weight`` x the KL divergence from the
    exact to the predicted distribution over each sample's tokens, proportional to (capacity + eps) ** ``sharpness``
    (what a min-max map's order depends on: the peaks; a sharpness above 1 weighs the top tokens more)."""
    target = (capacity.float() + LOG_EPSILON).log()
    squared = ((predicted - target) ** 2 * token_mask).sum() / token_mask.sum()
    masked = lambda t: (sharpness * t).masked_fill(~token_mask, float("-inf"))  # noqa: E731
    kl = torch.nn.functional.kl_div(masked(predicted).log_softmax(-1).masked_fill(~token_mask, 0),
                                    masked(target).log_softmax(-1).masked_fill(~token_mask, 0),
                                    log_target=True, reduction="none").sum(-1).mean()
    return squared + rank_weight * kl


class ExplainerFit(L.LightningModule):
    """Fits an :class:`ExplainerNetwork` to the exact capacities of batches from an
    :class:`~m2ib_lightning.data.explainer.ExplainerDataModule`."""

    def __init__(self, backbone: Any, network: ExplainerNetwork, layers: dict[str, int], *, lr: float = 1e-3,
                 weight_decay: float = 0.01, warmup_steps: int = 100, rank_weight: float = 1.0,
                 rank_sharpness: float = 2.0):
        super().__init__()
        self.backbone, self.network, self.layers = backbone, network, layers
        self.model = backbone.module  # registered, so that Lightning moves it to the device; frozen below
        self.model.requires_grad_(False)
        self.save_hyperparameters(ignore=["backbone", "network"])
        self.agreement = torch.nn.ModuleDict({k: CatMetric() for k in AGREEMENT_KEYS})

    def predict_logs(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        with torch.no_grad(), eval_mode(self.model):
            states, embeddings = tower_features(self.backbone, self.layers, batch["pixel_values"], batch["input_ids"],
                                                batch["attention_mask"])
        masks = {m: states[m].token_mask.bool() for m in MODALITIES}
        return self.network({m: states[m].hidden for m in MODALITIES}, masks, embeddings), masks

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logs, masks = self.predict_logs(batch)
        targets = {"image": to_width(batch["target_image"], logs["image"].shape[1]), "text": batch["target_text"]}
        losses = {m: explainer_loss(logs[m], targets[m], masks[m], self.hparams.rank_weight, self.hparams.rank_sharpness)
                  for m in MODALITIES}
        for m, value in losses.items():
            self.log(f"train/loss_{m}", value, batch_size=len(batch["id"]))
        loss = losses["image"] + losses["text"]
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logs, masks = self.predict_logs(batch)
        rows, cols = self.backbone.patch_grid(batch["pixel_values"])
        patches = rows * cols  # the map's tokens: the prefix (CLS) is left out
        values = map_agreement(logs["image"][:, -patches:], batch["target_image"][:, -patches:], logs["text"],
                               batch["target_text"], masks["text"].sum(1))
        for name, metric in self.agreement.items():
            metric.update(values[name][~values[name].isnan()])

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.agreement.items():
            values = metric.compute() if metric.update_count else torch.zeros(0)
            if values.numel():
                self.log(f"val/{name}_median" if "spearman" in name else f"val/{name}", values.median() if "spearman" in name
                         else values.mean(), prog_bar=name != "image_peak_in_top", sync_dist=False)
            metric.reset()

    def configure_optimizers(self):
        return adamw_with_warmup_cosine(self.network, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps,
                                        int(self.trainer.estimated_stepping_batches))


class AnswerExplainerFit(ExplainerFit):
    """Fits an :class:`~m2ib_lightning.amortised.network.AnswerExplainerNetwork` to the exact capacities of batches of
    questions (each with the answer the exact run explained) from an ``ExplainerDataModule(questions=True)``; the
    held-out agreement is on each picture's patches (CLS and padding left out) and the question's tokens."""

    def predict_logs(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per tower the predicted log capacities and where they count (the text laid out as ``input_ids``), and
        ``patches``: the image positions that are patches of the picture."""
        joined = {k: v.to(batch["input_ids"].device) for k, v in self.backbone.join_inputs(batch["image_items"]).items()}
        answer_batch = self.backbone.answer_batch(joined.pop("pixel_values"), batch["input_ids"], batch["attention_mask"],
                                                  batch["answer_ids"], batch["answer_mask"], **joined)
        with eval_mode(self.model):
            features = answer_features(self.backbone, answer_batch, self.layers)
        logs = self.network(features.hidden, features.positions, features.context)
        text, text_mask = text_by_input_column(answer_batch, logs["text"], tuple(batch["input_ids"].shape))
        image_mask = features.positions["image"]
        return {"image": logs["image"], "text": text}, {"image": image_mask, "text": text_mask,
                                                         "patches": image_mask & (answer_batch.image.cells >= 0)}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logs, masks = self.predict_logs(batch)
        values = masked_agreement(logs["image"], to_width(batch["target_image"], logs["image"].shape[1]), masks["patches"], logs["text"], batch["target_text"],
                                  masks["text"])
        for name, metric in self.agreement.items():
            metric.update(values[name][~values[name].isnan()])


def to_width(values: Tensor, width: int) -> Tensor:
    """(B, T) exact capacities as (B, width), the prediction's: a shard pads its rows to its own batch's most tokens
    (zeros), which for pictures of several sizes need not be this batch's."""
    if values.shape[1] >= width:
        return values[:, :width]
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))
