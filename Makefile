# Two commands a user needs: `make demo` (export the demo model and serve it) and `make test`.
# Both create/use .venv in the repo root. torch is pinned: 2.14.1 + torchvision 0.29.1
# (Meta's sam3 package imports torchvision; on this kind of machine both come from local disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_BUNDLE ?= demo-bundle
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: venv runtime-venv demo demo-bundle serve test test-slow lint clean

$(VENV)/.installed: requirements/runtime.txt requirements/export.txt requirements/dev.txt requirements/tritonserver.txt requirements/typecheck.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -r requirements/dev.txt
	# TensorRT's type stubs without TensorRT (--no-deps: see the file).
	$(PIP) install -q --no-deps -r requirements/typecheck.txt
	# A real tritonserver for the Triton tests; --no-deps: see the file. Where no wheel fits, they skip.
	$(PIP) install -q --no-deps -r requirements/tritonserver.txt || echo "tritonserver not installable here: the Triton tests will skip"
	touch $@

venv: $(VENV)/.installed

$(DEMO_BUNDLE)/manifest.json: | venv
	$(PY) -m export demo --out $(DEMO_BUNDLE)

demo-bundle: $(DEMO_BUNDLE)/manifest.json

# Export the random-weight demo model (once), then serve it on http://$(HOST):$(PORT)/
demo: demo-bundle
	$(PY) -m server --bundle $(DEMO_BUNDLE) --host $(HOST) --port $(PORT)

test: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_BUNDLE) .pytest_cache
