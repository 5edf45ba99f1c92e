# make demo : set up .venv and run the quickstart pipeline on the built-in simulated phantom
# make test : set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# the pinned CPU wheel is on disk; an unpinned torch would pull GBs of CUDA packages
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile $(TORCH_PIN)
	$(PY) -m pip install -q --no-compile -e ".[test]"
	@# fastMRI's own mask/metric code, for comparison tests only; --no-deps avoids torchvision/CUDA
	$(PY) -m pip install -q --no-compile --no-deps fastmri==0.3.0
	touch $@

demo: setup
	$(VENV)/bin/qsmkit run pipelines/quickstart.yaml --output-dir out/quickstart

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache
