"""M2IB itself as a method of the comparison (both maps)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..amortised.answers import AmortisedAnswerM2IB
from ..amortised.explainer import AmortisedM2IB
from ..engine import M2IB, M2IBConfig
from .base import AttributionMethod, Maps, register_method
from .scoring import AnswerScorer


@register_method
class M2IBMethod(AttributionMethod):
    """M2IB itself (both maps); ``settings`` are :class:`~m2ib_lightning.engine.M2IBConfig`'s."""

    name = "m2ib"
    has_text_map = True

    def __init__(self, backbone: Any, **settings: Any):
        AttributionMethod.__init__(self, backbone)
        self.config = M2IBConfig(**settings)
        self.explainer = None if isinstance(self.scorer, AnswerScorer) else M2IB(self.backbone, self.config)

    def attribute(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor, special: Tensor | None = None,
        answers: tuple[Tensor, Tensor] | None = None, ids: list[str] | None = None,
    ) -> Maps:
        if self.explainer is None:  # a VLM that answers: the fit term is log p(answer)
            from ..answers import attribute_answers

            if answers is not None:
                self.scorer.bind(*answers)
            result = attribute_answers(self.backbone, pixel_values, input_ids, attention_mask, *self.scorer._bound(),
                                       config=self.config, seed=seeds)
            return Maps(result.image_maps, result.text_maps)
        result = self.explainer.attribute(pixel_values, input_ids, attention_mask, seed=seeds)
        return Maps(result.image_maps, result.text_maps)


@register_method
class AmortisedM2IBMethod(AttributionMethod):
    """M2IB's maps predicted in one forward pass by an amortised explainer (``explainer``: a directory or
    ``builtin:NAME``) trained on exact fits of this backbone: of pairs, or, for a VLM that answers, of its answers
    (no shipped default there: name the one ``configs/fit_explainer.yaml`` trained)."""

    name = "m2ib_amortised"
    has_text_map = True

    def __init__(self, backbone: Any, explainer: str | None = None):
        AttributionMethod.__init__(self, backbone)
        self.answers = isinstance(self.scorer, AnswerScorer)
        if self.answers:
            if explainer is None:
                raise ValueError("m2ib_amortised on a VLM that answers needs settings.explainer: the directory of an "
                                 "explainer trained on an exact attribute_vqa run of this model (configs/fit_explainer.yaml)")
            self.explainer: Any = AmortisedAnswerM2IB(self.backbone, explainer)
        else:
            self.explainer = AmortisedM2IB(self.backbone, explainer or "builtin:shapes-clip-amortised")

    def attribute(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor, special: Tensor | None = None,
        answers: tuple[Tensor, Tensor] | None = None, ids: list[str] | None = None,
    ) -> Maps:
        if self.answers:
            if answers is not None:
                self.scorer.bind(*answers)
            result = self.explainer.attribute(pixel_values, input_ids, attention_mask, *self.scorer._bound())
        else:
            result = self.explainer.attribute(pixel_values, input_ids, attention_mask)
        return Maps(result.image_maps, result.text_maps)
