"""A run's identity (``run.json``: task, result settings, layout version) and the refusals of a run that does
not match the output directory it is pointed at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .files import IDENTITY_FILE, INDEX_PATTERN, atomic_write


class OutputRefused(RuntimeError):
    """This run may not write into its output_dir; the message says why (``train.py`` exits 2 with it)."""


class OutputInUse(OutputRefused):
    """Another live run writes into the same output_dir."""


class OutputMismatch(OutputRefused, ValueError):
    """The output_dir holds a run of another task or with other result settings."""


#: bumped when the files of a run change in a way older readers or resumes cannot follow
LAYOUT_VERSION = 1


def run_identity(task: str, settings: dict[str, Any], model_revision: str | None = None) -> dict[str, Any]:
    """What makes a run's results what they are: its task, the settings that change them, the layout, the model
    revision (a hub checkpoint's commit where there is one), and the intra-op thread count (set by the first run)."""
    return {"task": task, "layout": LAYOUT_VERSION, "model_revision": model_revision,
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)), "threads": None}


def _differences(key: str, saved: Any, asked: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, asked value) of each leaf setting that differs, e.g. ``m2ib.beta``."""
    if isinstance(saved, dict) and isinstance(asked, dict):
        return [d for name in sorted(set(saved) | set(asked)) for d in _differences(f"{key}.{name}", saved.get(name), asked.get(name))]
    return [] if saved == asked else [(key, saved, asked)]


def claim_identity(output_dir: str | Path, identity: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """The identity a run in ``output_dir`` must keep: written by the first run, checked by every later one.

    ``threads``: the intra-op thread count asked for (None: the first run's, or this process's). Raises
    :class:`OutputMismatch` naming what differs. Call it holding the run lock.
    """
    path = Path(output_dir) / IDENTITY_FILE
    asked = dict(identity)
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise OutputMismatch(f"{path} is damaged ({err}); it names the run this output_dir holds") from None
        where = f"output_dir={str(path.parent)!r} holds a {saved.get('task')!r} run"
        if saved.get("task") != asked["task"]:
            raise OutputMismatch(f"{where}; a {asked['task']!r} run cannot write into it: choose another output_dir")
        if saved.get("layout") != asked["layout"]:
            raise OutputMismatch(f"{where} of layout {saved.get('layout')} (this version writes {asked['layout']}): "
                                 "choose another output_dir")
        for key in sorted(set(saved["settings"]) | set(asked["settings"])):
            if saved["settings"].get(key) != asked["settings"].get(key):
                changes = ", ".join(f"{name}={old!r} (asked: {new!r})"
                                    for name, old, new in _differences(key, saved["settings"].get(key), asked["settings"].get(key)))
                raise OutputMismatch(f"output_dir={str(path.parent)!r} holds a run with other `{key}` settings: {changes}; "
                                     "resume it with the same settings or choose another output_dir")
        if saved.get("model_revision") != asked["model_revision"] and asked["model_revision"] is not None:
            raise OutputMismatch(f"{where} of model revision {saved.get('model_revision')}, this one loads "
                                 f"{asked['model_revision']}: pin model.revision or choose another output_dir")
        if threads is not None and saved.get("threads") not in (None, threads):
            raise OutputMismatch(f"{where} with {saved['threads']} intra-op threads per process (threads={threads} asked): "
                                 "maps are bitwise the same only with the same count; leave `threads` unset to keep it")
        return saved
    if any(Path(output_dir).glob(INDEX_PATTERN)):
        raise OutputMismatch(f"output_dir={str(output_dir)!r} holds results without a {IDENTITY_FILE} (another tool's, "
                             "or an older version's): choose another output_dir")
    asked["threads"] = threads if threads is not None else torch.get_num_threads()
    atomic_write(path, json.dumps(asked, indent=2, sort_keys=True))
    return asked
