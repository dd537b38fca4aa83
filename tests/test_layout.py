"""The package's layers: the pure-torch core imports without Lightning, and the callbacks load once under either name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

#: the Lightning shell: every other module of the package is the pure-torch core
SHELL = ("m2ib_lightning.modules", "m2ib_lightning.tasks", "m2ib_lightning.config",
         "m2ib_lightning.data.attribution", "m2ib_lightning.data.explainer", "m2ib_lightning.callbacks")

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
    # the package's name first in this process (the tasks import it); the top-level name first in a fresh one
    exec(SAME_CALLBACKS.format(first="m2ib_lightning.callbacks", second="callbacks"), {})
    code = SAME_CALLBACKS.format(first="callbacks", second="m2ib_lightning.callbacks")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and int(proc.stdout) >= 7, proc.stderr[-3000:]


def _registries():
    from m2ib_lightning.backbones.registry import BACKBONES, register_backbone
    from m2ib_lightning.baselines import METHODS, register_method
    from m2ib_lightning.metrics import METRICS
    from m2ib_lightning.probing.adapters import PROBING_ADAPTERS, register_probing_adapter

    def method(name: str, overwrite: bool = False):
        cls = type("Method", (), {"name": name, "__init__": lambda self, *a, **k: setattr(self, "args", (a, k))})
        return register_method(overwrite=overwrite)(cls) if overwrite else register_method(cls)

    return {  # registry -> register(name, overwrite) through its public helper
        "backbone": (BACKBONES, lambda name, overwrite=False: register_backbone(name, lambda *a, **k: ("b", a, k), overwrite=overwrite)),
        "method": (METHODS, method),
        "probing": (PROBING_ADAPTERS, lambda name, overwrite=False: register_probing_adapter(
            name, lambda model: False, lambda model: ("p", model), overwrite=overwrite)),
        "metric": (METRICS, lambda name, overwrite=False: METRICS.register(name, lambda *a, **k: ("m", a, k), overwrite=overwrite)),
    }


@pytest.mark.parametrize("kind", ["backbone", "method", "probing", "metric"])
def test_each_registry_registers_lists_creates_and_refuses_a_taken_name_unless_told(kind):
    registry, register = _registries()[kind]
    before = registry.names()
    name = f"test_{kind}_entry"
    try:
        register(name)
        assert registry.names() == [*before, name] and name in registry
        with pytest.raises(ValueError, match=f"{name!r} is already registered"):
            register(name)
        first = registry[name]
        register(name, overwrite=True)
        assert registry[name] is not first and registry.names() == [*before, name]
        if kind != "probing":  # a probing entry is (accepts, factory), tried by as_probing_adapter
            created = registry.create(name, 1, x=2)
            assert (created.args if kind == "method" else created[1:]) == ((1,), {"x": 2})
        with pytest.raises(KeyError, match="registered: "):
            registry["nope"]
        with pytest.raises(ValueError, match="without ':'"):
            register("pkg.module:Name")
    finally:
        registry._entries.pop(name, None)
    assert registry.names() == before


def test_train_list_prints_every_registry(capsys):
    import train
    from m2ib_lightning.baselines import METHODS
    from m2ib_lightning.metrics import METRICS

    assert train.main(["--list"]) == 0
    out = capsys.readouterr().out
    for names in (METHODS.names(), METRICS.names(), ["hf_clip", "hf_siglip", "hf_blip_itc", "hf_blip_vqa", "cross_head", "shapes-clip", "with probe sites"]):
        assert all(name in out for name in names)


def test_no_task_data_baseline_or_probe_reaches_into_a_model():
    """Model internals (towers, layers, hooks on them) are the adapters' alone: the layers above name none."""
    import re

    internals = re.compile(r"\.(vision_model|text_encoder|text_decoder|text_model|language_model|vision_tower|visual|"
                           r"encoder\.layers?|crossattention)\b")
    package = ROOT / "m2ib_lightning"
    files = [*package.glob("tasks/*.py"), *package.glob("data/*.py"), *package.glob("probing/*.py"),
             *package.glob("baselines/*.py"), *package.glob("engine/*.py"),
             *package.glob("modules/*.py"), *(package / name for name in ("evaluation.py", "answers.py"))]
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in files for n, line in enumerate(path.read_text().splitlines(), 1)
                 if internals.search(line.split("#")[0]) and not line.lstrip().startswith(('"', "'"))]
    assert not offenders, offenders
