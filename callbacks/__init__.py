"""Lightning callbacks of m2ib-lightning: attribution and evaluation export, run summary, progress and TensorBoard logging.

Installed as ``m2ib_lightning.callbacks``; in a checkout it is the top-level ``callbacks/`` folder. Imported as
``callbacks`` (from the repository root) it is the same module, not a second copy of these files, so that
``isinstance`` and registries agree across both names.
"""

if __name__ == "callbacks":
    import importlib as _importlib
    import sys as _sys

    _package = _importlib.import_module("m2ib_lightning.callbacks")
    _sys.modules[__name__] = _package
    for _name, _module in list(_sys.modules.items()):
        if _name.startswith("m2ib_lightning.callbacks."):
            _sys.modules["callbacks." + _name.removeprefix("m2ib_lightning.callbacks.")] = _module
else:
    from .attribution_writer import AttributionWriter, RollingShardWriter
    from .evaluation_writer import EvaluationWriter
    from .output_owner import OutputOwner
    from .run_summary import RunProgress, RunSummary, SampleProgressBar
    from .stop_on_sigterm import StopOnSigterm
    from .tensorboard_maps import TensorBoardAttributionLogger

    __all__ = [
        "AttributionWriter", "EvaluationWriter", "OutputOwner", "RollingShardWriter", "RunProgress", "RunSummary", "SampleProgressBar", "StopOnSigterm", "TensorBoardAttributionLogger",
    ]
