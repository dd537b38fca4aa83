"""How closely one map follows another, per sample: Spearman's rho of the image capacities on the patch grid and of
the text capacities over each sample's tokens, and whether the first map's peak lies in the second's top region."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef

#: what :func:`map_agreement` reports per sample
AGREEMENT_KEYS = ("image_spearman", "text_spearman", "image_peak_in_top")
#: the top region of a map: this share of its patches (at least one)
TOP_FRACTION = 0.1


def rank_agreement(predicted: Tensor, exact: Tensor) -> Tensor:
    """Spearman's rho per row of two (B, N) score tables (ties get their mean rank); NaN for a constant row."""
    if predicted.shape != exact.shape or predicted.dim() != 2:
        raise ValueError(f"predicted and exact must both be (B, N), got {tuple(predicted.shape)} and {tuple(exact.shape)}")
    if predicted.shape[1] < 2:
        return torch.full((predicted.shape[0],), float("nan"))
    rho = spearman_corrcoef(predicted.t().double(), exact.t().double())
    constant = (predicted.amax(1) == predicted.amin(1)) | (exact.amax(1) == exact.amin(1))
    return rho.reshape(-1).float().cpu().masked_fill(constant.cpu(), float("nan"))


def peak_in_top(predicted: Tensor, exact: Tensor, fraction: float = TOP_FRACTION) -> Tensor:
    """Per row of (B, N): 1 where ``predicted``'s highest entry is among ``exact``'s top ``fraction`` entries."""
    k = max(1, round(fraction * exact.shape[1]))
    top = exact.topk(k, dim=1).indices
    return (top == predicted.argmax(1, keepdim=True)).any(1).float().cpu()


def map_agreement(predicted_image: Tensor, exact_image: Tensor, predicted_text: Tensor, exact_text: Tensor,
                  lengths: Tensor) -> dict[str, Tensor]:
    """Per-sample agreement of two explainers: image capacities (B, patches) on the patch grid (CLS left out),
    text capacities (B, L) over each sample's first ``lengths`` tokens."""
    text = torch.stack([rank_agreement(predicted_text[b : b + 1, :n], exact_text[b : b + 1, :n])[0]
                        for b, n in enumerate(lengths.tolist())])
    return {"image_spearman": rank_agreement(predicted_image, exact_image), "text_spearman": text,
            "image_peak_in_top": peak_in_top(predicted_image, exact_image)}


def masked_agreement(predicted_image: Tensor, exact_image: Tensor, image_mask: Tensor, predicted_text: Tensor,
                     exact_text: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
    """:func:`map_agreement` where each sample has its own tokens: image (B, T) and text (B, L) scores compared
    over the positions their masks mark (pictures of several sizes, prompts with image tokens among the words)."""
    def per_sample(predicted: Tensor, exact: Tensor, mask: Tensor, score: Any) -> Tensor:
        return torch.stack([score(predicted[b][mask[b]][None], exact[b][mask[b]][None])[0] for b in range(len(mask))])

    return {"image_spearman": per_sample(predicted_image, exact_image, image_mask, rank_agreement),
            "text_spearman": per_sample(predicted_text, exact_text, text_mask, rank_agreement),
            "image_peak_in_top": per_sample(predicted_image, exact_image, image_mask, peak_in_top)}
