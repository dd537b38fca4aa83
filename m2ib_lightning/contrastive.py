"""Training a CLIP with Lightning: a multi-positive contrastive loss and retrieval validation.

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

from .backbones.base import features


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
                             lr_scales: dict[str, float] | None = None) -> dict:
    """AdamW (no decay on biases, norms and embeddings), linear warm-up, cosine decay to 0: the recipe of every fit.

    ``lr_scales``: {parameter-name prefix: factor} for parts that learn slower (a pretrained vision tower)."""
    scales = lr_scales or {}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
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
