"""The small protocol every vision-language backbone adapter meets.

The M2IB engine never touches a model directly: it asks an adapter to run one
tower up to the output of block ``layer`` (the *prefix*, run once per sample)
and to run the rest of the tower from there to the projected embedding (the
*tail*, run at every fitting step). Anything model specific, such as the token
layout, pooling and masks, stays behind this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor, nn

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")


@dataclass(frozen=True)
class TowerState:
    """A tower's residual stream after block ``layer``, plus what its tail needs.

    ``hidden`` is (B, T, D); ``token_mask`` (B, T) marks real tokens;
    ``pool_index`` (B,) is the position the tower pools into its embedding;
    ``attention_bias`` is an optional additive (B, 1, T, T) mask for the tail.
    """

    hidden: Tensor
    token_mask: Tensor
    pool_index: Tensor
    layer: int
    attention_bias: Tensor | None = None

    def repeat_interleave(self, copies: int) -> "TowerState":
        """Repeat every row ``copies`` times, in place of K noise copies per sample."""
        rep = lambda t: None if t is None else t.repeat_interleave(copies, dim=0)  # noqa: E731
        return replace(
            self,
            hidden=rep(self.hidden),
            token_mask=rep(self.token_mask),
            pool_index=rep(self.pool_index),
            attention_bias=rep(self.attention_bias),
        )


@runtime_checkable
class VisionLanguageBackbone(Protocol):
    """What the engine needs from a dual-encoder model."""

    #: The wrapped ``nn.Module`` (switched to eval mode during a fit, never modified).
    module: nn.Module
    #: Tokens before the patch grid in the image tower (1 for CLS).
    num_prefix_tokens: int

    def num_layers(self, modality: Modality) -> int:
        """Number of encoder blocks of the tower."""

    def patch_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        """(rows, cols) of the patch grid for images of this size."""

    def embed(self, modality: Modality, inputs: dict[str, Tensor]) -> Tensor:
        """Clean projected embedding (B, P) of a whole batch."""

    def prefix(self, modality: Modality, inputs: dict[str, Tensor], layer: int) -> TowerState:
        """Run the tower up to and including block ``layer``."""

    def tail(self, modality: Modality, hidden: Tensor, state: TowerState) -> Tensor:
        """Run blocks ``state.layer + 1 ..``, final norm, pooling and projection on ``hidden``."""

    def validate_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Raise ValueError naming the argument if the inputs do not fit this model."""


def tower_inputs(modality: Modality, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """The keyword inputs of one tower."""
    if modality == "image":
        return {"pixel_values": pixel_values}
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def other(modality: Modality) -> Modality:
    return "text" if modality == "image" else "image"


