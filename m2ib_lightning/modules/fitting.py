"""The fits of the shipped models, as LightningModules: a CLIP (a multi-positive contrastive loss and retrieval
validation) and the VQA models (BLIP VQA, LLaVA: the answer's cross-entropy, held-out accuracy per question kind).

In the shapes world a caption often describes several images of a batch ("a red
circle" fits every image holding one). The plain one-positive CLIP loss then
pushes correct matches apart; here every caption that truly describes an image
counts as a positive for it, in both directions.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import features
from ..backbones.hf_blip_vqa import first_step_logits
from ..shapes.questions import QUESTION_KINDS, TWO_CHOICE_KINDS


def multi_positive_contrastive_loss(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean of image-to-text and text-to-image -log(P(any positive)) for (B, B) logits."""
    def one_way(scores: Tensor, pos: Tensor) -> Tensor:
        return (scores.logsumexp(1) - scores.masked_fill(~pos, -math.inf).logsumexp(1)).mean()

    return (one_way(logits, positives) + one_way(logits.t(), positives.t())) / 2


class ContrastiveCLIP(L.LightningModule):
    """Fits an injected ``transformers.CLIPModel`` on batches with a ``positives`` matrix."""

    def __init__(self, model: nn.Module, lr: float = 5e-4, weight_decay: float = 0.1, warmup_steps: int = 200):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def _embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        image = features(self.model.get_image_features(pixel_values=batch["pixel_values"]))
        text = features(self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, text = self._embed(batch)
        scale = self.model.logit_scale.clamp(max=math.log(100)).exp()
        loss = multi_positive_contrastive_loss(scale * image @ text.t(), batch["positives"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        image, text = self._embed(batch)
        candidates = int(batch["candidates"])
        scores = torch.einsum("bp,bkp->bk", image, text.view(image.shape[0], candidates, -1))
        accuracy = (scores.argmax(1) == 0).float().mean()
        self.log(f"val/retrieval_acc@{candidates}", accuracy, prog_bar=True, batch_size=image.shape[0], sync_dist=True)

    def configure_optimizers(self):
        return adamw_with_warmup_cosine(self.model, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps,
                                        int(self.trainer.estimated_stepping_batches))


def adamw_with_warmup_cosine(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                             lr_scales: dict[str, float] | None = None, extra: nn.Module | None = None) -> dict:
    """AdamW (no decay on biases, norms and embeddings), linear warm-up, cosine decay to 0: the recipe of every fit.

    ``lr_scales``: {parameter-name prefix: factor} for parts that learn slower (a pretrained vision tower);
    ``extra``: parameters trained beside the model's (a training-only head), at the full rate."""
    scales = lr_scales or {}
    groups: dict[tuple[bool, float], list] = {}
    named = [*model.named_parameters(), *(extra.named_parameters(prefix="training_only") if extra is not None else ())]
    for name, p in named:
        decays = p.ndim >= 2 and "embedding" not in name
        scale = next((f for prefix, f in scales.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decays, scale), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
         for (decays, scale), ps in groups.items()], lr=lr
    )
    total = max(total_steps, 1)
    warmup = min(warmup_steps, total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AnswerFit(L.LightningModule):
    """What the VQA fits share: an injected model, AdamW with warm-up and cosine decay, and held-out accuracy per
    question kind (the first answer token's argmax over the whole vocabulary, as the model answers)."""

    def __init__(self, model: nn.Module, lr: float = 5e-4, weight_decay: float = 0.05, warmup_steps: int = 200,
                 lr_scales: dict[str, float] | None = None):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def first_answer_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, vocab) logits of the first answer token."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            correct = self.first_answer_logits(batch).argmax(-1) == batch["answer"]
        for i, kind in enumerate(QUESTION_KINDS):
            rows = batch["kind"] == i
            if rows.any():
                self.log(f"val/acc_{kind}", correct[rows].float().mean(), batch_size=int(rows.sum()),
                         prog_bar=kind in TWO_CHOICE_KINDS, sync_dist=True)

    def configure_optimizers(self):
        return adamw_with_warmup_cosine(self.model, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps,
                                        int(self.trainer.estimated_stepping_batches), self.hparams.lr_scales)


class VQATraining(AnswerFit):
    """Fits an injected ``BlipForQuestionAnswering`` on one-word answers."""

    def first_answer_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return first_step_logits(self.model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss


class LlavaTraining(AnswerFit):
    """Fits an injected ``LlavaForConditionalGeneration`` on one-word answers.

    ``position_loss`` > 0: each image token (the projector's output, what the language model reads) must also tell
    its patch's row and column through a linear head of the fit's own (not saved with the model), the loss added
    with that weight: the image tokens keep where they are, which side and place questions read. ``position_axes``
    picks what they must tell: ``("row", "col")`` or one of them (side and place read only the column).
    ``position_loss_steps`` > 0 applies it in the first that many optimizer steps only: it starts the spatial
    kinds, whose own answers then keep the image tokens' positions, and leaves the tower to the other kinds after."""

    AXES = ("row", "col")

    def __init__(self, model: nn.Module, lr: float = 5e-4, weight_decay: float = 0.05, warmup_steps: int = 200,
                 lr_scales: dict[str, float] | None = None, position_loss: float = 0.0,
                 position_axes: tuple[str, ...] = AXES, position_loss_steps: int = 0):
        super().__init__(model, lr, weight_decay, warmup_steps, lr_scales)
        if position_loss_steps < 0:
            raise ValueError(f"position_loss_steps must be >= 0 (0: every step), got {position_loss_steps}")
        vision = model.config.vision_config
        self.grid = vision.image_size // vision.patch_size
        self.position_loss = position_loss
        self.position_axes = tuple(position_axes)
        self.position_loss_steps = position_loss_steps
        if not self.position_axes or any(axis not in self.AXES for axis in self.position_axes):
            raise ValueError(f"position_axes must be a non-empty subset of {self.AXES}, got {position_axes!r}")
        self.position_head = (nn.Linear(model.config.text_config.hidden_size, len(self.position_axes) * self.grid)
                              if position_loss > 0 else None)

    def _forward(self, batch: dict[str, Tensor], logits_to_keep: int) -> Tensor:
        return self.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], logits_to_keep=logits_to_keep).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Every answer of the batch's conversations (the vocabulary is small: every position's logits are cheap)."""
        taken: list[Tensor] = []
        positions = self.position_head is not None and (
            self.position_loss_steps == 0 or self.global_step < self.position_loss_steps)
        handle = (self.model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: taken.append(out))
                  if positions else None)
        try:
            logits = self._forward(batch, 0)[:, :-1]
        finally:
            if handle is not None:
                handle.remove()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
        self.log("train/loss", loss, prog_bar=True)
        if positions:
            tokens = taken[0][:, -self.grid ** 2:]  # the patches in raster order (a CLS, if kept, comes first)
            cells = torch.arange(self.grid ** 2, device=tokens.device).expand(len(tokens), -1)
            truth = {"row": cells // self.grid, "col": cells % self.grid}
            logits = self.position_head(tokens).float().split(self.grid, dim=-1)
            where = sum(nn.functional.cross_entropy(axis_logits.flatten(0, 1), truth[axis].flatten())
                        for axis, axis_logits in zip(self.position_axes, logits))
            self.log("train/position_loss", where)
            loss = loss + self.position_loss * where
        if self.position_head is not None:  # Lightning shows a metric's last value until the epoch ends: say when it stops
            self.log("train/position_loss_weight", self.position_loss if positions else 0.0)
        return loss

    def configure_optimizers(self):
        return adamw_with_warmup_cosine(self.model, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps,
                                        int(self.trainer.estimated_stepping_batches), self.hparams.lr_scales,
                                        extra=self.position_head)

    def first_answer_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """One question per prompt (held-out batches): the position before the answer word and ``</s>``."""
        return self._forward(batch, 3)[:, 0]
