"""Attribution methods to compare M2IB with, one file each, through the backbone adapter protocol (any shipped backbone).

Every method explains the same score, the cosine similarity between the image's and
the caption's embeddings (``backbone.embed``), or, for a VLM that answers questions,
log p(answer) under teacher forcing (:class:`AnswerScorer`), and returns :class:`Maps` of M2IB's
shapes: an image map (B, H, W) and, where the method has one, a text map (B, L), each
min-maxed to [0, 1] (text over the caption's real tokens, 0 at padding). One class per
method with one ``attribute`` call, as in Captum; Captum does the gradient methods where
its API fits. A method is picked by name from :data:`METHODS` (``register_method`` adds one).

Methods touch the model only through hooks, removed also on errors, and leave its
weights, gradients and train/eval flags as they were.
"""

from .base import METHODS, AttributionMethod, Maps, make_method, register_method
from .scoring import AnswerScorer, PairScorer, scorer_of
from .tokens import replacement_token, special_tokens
from .m2ib import M2IBMethod
from .saliency import GradientSaliency
from .integrated_gradients import IntegratedGradientsMethod
from .grad_x_activation import GradXActivation
from .grad_cam import GradCAM
from .rise import RISE
from .rollout import AttentionRollout
from .chefer import CheferRelevance
from .random_map import RandomMap, random_image_maps
from .external import ExternalMaps

__all__ = [
    "METHODS", "AnswerScorer", "AttentionRollout", "ExternalMaps", "AttributionMethod", "CheferRelevance", "GradCAM", "GradXActivation",
    "GradientSaliency", "IntegratedGradientsMethod", "M2IBMethod", "Maps", "PairScorer", "RISE", "RandomMap",
    "make_method", "random_image_maps", "register_method", "replacement_token", "scorer_of", "special_tokens",
]
