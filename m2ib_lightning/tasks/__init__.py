"""The runs behind ``train.py``: one module per kind of run, each with its ``run(cfg)`` and, beside it, the schema
of its tasks (``SCHEMAS``), which ``load_config`` checks a config against."""

from __future__ import annotations

import importlib

#: task name -> the module that runs it
TASK_MODULES = {
    "attribute": "attribute", "attribute_vqa": "attribute", "fit_clip": "fit_clip", "fit_vqa": "fit_vqa",
    "fit_llava": "fit_llava", "probe": "probe", "probe_vqa": "probe_vqa", "evaluate": "evaluate", "evaluate_vqa": "evaluate",
    "fit_explainer": "fit_explainer", "sweep": "sweep",
}


def task_module(task: str):
    """The module of a task (imported on first use: a run loads only its own)."""
    return importlib.import_module(f"{__name__}.{TASK_MODULES[task]}")


def schemas() -> dict[str, type]:
    """Every task's schema, in ``TASK_MODULES`` order."""
    return {task: task_module(task).SCHEMAS[task] for task in TASK_MODULES}
