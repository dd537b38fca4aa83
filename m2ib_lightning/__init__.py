"""m2ib-lightning: attribute and probe vision-language models at scale.

The engine (``attribute``, ``M2IB``, the backbone adapters) is pure torch and
imports no Lightning; the Lightning shell lives in ``m2ib_lightning.module``.
"""

from .backbones import HFCLIPBackbone, VisionLanguageBackbone, as_backbone, register_backbone
from .engine import M2IB, AttributionResult, M2IBConfig, attribute
from .results import AttributionRecord, read_attributions

__version__ = "0.1.0"

__all__ = [
    "M2IB",
    "AttributionResult",
    "HFCLIPBackbone",
    "AttributionRecord",
    "M2IBConfig",
    "VisionLanguageBackbone",
    "as_backbone",
    "attribute",
    "read_attributions",
    "register_backbone",
]
