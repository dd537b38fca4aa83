"""Lightning callbacks of m2ib-lightning: attribution and evaluation export, run summary, progress and TensorBoard logging.

Installed as ``m2ib_lightning.callbacks``; in a checkout it is the top-level ``callbacks/`` folder.
"""

from .attribution_writer import AttributionWriter, RollingShardWriter
from .evaluation_writer import EvaluationWriter
from .output_owner import OutputOwner
from .run_summary import RunSummary, SampleProgressBar
from .tensorboard_maps import TensorBoardAttributionLogger

__all__ = [
    "AttributionWriter", "EvaluationWriter", "OutputOwner", "RollingShardWriter", "RunSummary", "SampleProgressBar", "TensorBoardAttributionLogger",
]
