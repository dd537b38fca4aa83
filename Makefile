# Each target does all set-up on a fresh machine: .venv, torch (CPU wheel) first, then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: run test bench compat clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes in first: installed after anything else, pip would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_runs.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_probe.py
	$(PY) benchmarks/bench_probe.py --family llava
	$(PY) benchmarks/bench_manifest.py
	$(PY) benchmarks/bench_explainer.py
	$(PY) benchmarks/bench_gpu.py

# The engine's tests against transformers 4.4x (block outputs are tuples there), in a venv of its own.
COMPAT_VENV ?= .venv-transformers4
compat:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(COMPAT_VENV)/bin/python -m pip install --quiet "transformers==4.46.3" numpy pillow safetensors pytest
	PYTHONPATH=. $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_errors.py tests/test_backbones.py \
		-k "not checkpoint and not without_length_limit"  # saved bundles need 5.x tokenizer classes

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache
