"""Lightning callbacks of m2ib-lightning: attribution export and TensorBoard logging."""

from .attribution_writer import AttributionWriter
from .tensorboard_maps import TensorBoardAttributionLogger

__all__ = ["AttributionWriter", "TensorBoardAttributionLogger"]
