"""The M2IB attribution engine: pure torch, no Lightning.

For every image-text pair two bottlenecks are fitted, one in each tower, on
the output of encoder block ``layer``. The fit of a whole batch runs at once:
alpha has shape (B, T, D) and the batch loss is the *sum* of per-sample
losses, so every sample's gradient (and Adam's elementwise update) equals its
solo run. Each sample draws its noise from its own generator, so its maps do
not depend on its batch-mates, the batch size or the number of devices.
"""

from .config import M2IBConfig, Seeds
from .inputs import _as_seeds, screen
from .m2ib import M2IB, attribute
from .maps import image_maps_from_capacity, minmax
from .noise import draw_noise, generators_for
from .objective import TowerObjective, eval_mode, fit_tower
from .result import AttributionResult, TowerFit

__all__ = [
    "_as_seeds", "AttributionResult", "M2IB", "M2IBConfig", "Seeds", "TowerFit", "TowerObjective", "attribute", "draw_noise",
    "eval_mode", "fit_tower", "generators_for", "image_maps_from_capacity", "minmax", "screen",
]
