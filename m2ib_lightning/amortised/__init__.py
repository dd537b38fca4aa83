"""M2IB amortised: a small network over the frozen backbone's features, trained on exact fits
(``configs/fit_explainer.yaml``), that predicts M2IB's maps in one forward pass; pure torch, like the engine."""

from .answers import AmortisedAnswerM2IB, answer_features, new_answer_explainer
from .explainer import AmortisedM2IB, new_explainer, tower_features
from .fidelity import AGREEMENT_KEYS, map_agreement, masked_agreement, peak_in_top, rank_agreement
from .network import SHIPPED_EXPLAINERS, AnswerExplainerNetwork, ExplainerConfig, ExplainerNetwork, backbone_fingerprint

__all__ = [
    "AGREEMENT_KEYS", "AmortisedAnswerM2IB", "AmortisedM2IB", "AnswerExplainerNetwork", "ExplainerConfig", "ExplainerNetwork",
    "SHIPPED_EXPLAINERS", "answer_features", "backbone_fingerprint", "map_agreement", "masked_agreement", "new_answer_explainer",
    "new_explainer", "peak_in_top", "rank_agreement", "tower_features",
]
