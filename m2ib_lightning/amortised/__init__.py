"""M2IB amortised: a small network over the frozen backbone's features, trained on exact fits
(``configs/fit_explainer.yaml``), that predicts M2IB's maps in one forward pass; pure torch, like the engine."""

from .explainer import AmortisedM2IB, new_explainer, tower_features
from .fidelity import AGREEMENT_KEYS, map_agreement, peak_in_top, rank_agreement
from .network import SHIPPED_EXPLAINERS, ExplainerConfig, ExplainerNetwork, backbone_fingerprint

__all__ = [
    "AGREEMENT_KEYS", "AmortisedM2IB", "ExplainerConfig", "ExplainerNetwork", "SHIPPED_EXPLAINERS", "backbone_fingerprint",
    "map_agreement", "new_explainer", "peak_in_top", "rank_agreement", "tower_features",
]
