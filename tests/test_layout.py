"""The package's layers: the pure-torch core imports without Lightning, and the callbacks load once under either name."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

#: the Lightning shell: every other module of the package is the pure-torch core
SHELL = ("m2ib_lightning.module", "m2ib_lightning.evaluation", "m2ib_lightning.contrastive", "m2ib_lightning.tasks",
         "m2ib_lightning.data.attribution", "m2ib_lightning.callbacks")

WITHOUT_LIGHTNING = f"""
import importlib, pkgutil, sys

class NoLightning:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError("Lightning is not installed here: " + name)

sys.meta_path.insert(0, NoLightning())
import m2ib_lightning
shell = {SHELL!r}
core = [m.name for m in pkgutil.walk_packages(m2ib_lightning.__path__, "m2ib_lightning.")
        if not m.name.startswith(shell)]
for name in core:
    importlib.import_module(name)
print(len(core))
"""


def test_the_core_imports_with_lightning_unimportable():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_LIGHTNING], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 25  # engine, backbones, metrics, baselines, probing, data sources, models, ...


SAME_CALLBACKS = """
import {first}, {second}
import callbacks, m2ib_lightning.callbacks as package
import callbacks.attribution_writer, m2ib_lightning.callbacks.attribution_writer as writer
assert callbacks is package and callbacks.attribution_writer is writer
for name in package.__all__:
    assert getattr(callbacks, name) is getattr(package, name), name
print(len(package.__all__))
"""


def test_callbacks_from_the_repository_root_are_the_packages_own_in_either_import_order():
    for first, second in (("callbacks", "m2ib_lightning.callbacks"), ("m2ib_lightning.callbacks", "callbacks")):
        code = SAME_CALLBACKS.format(first=first, second=second)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and int(proc.stdout) >= 7, proc.stderr[-3000:]
