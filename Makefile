# Two commands for users: `make run` (the main job on the embedded default) and `make test`.
# Both build .venv from the frozen CPU lock when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/cpu.lock
# The +cpu torch build is not on PyPI; pip also finds it in a local wheel directory when present.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The environment is keyed on the lock and the project metadata: change either and it is rebuilt.
ENV_KEY := $(shell cat $(LOCK) pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(ENV_KEY)

export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-all lint format env clean

env: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@echo "==> building $(VENV) from $(LOCK) (key $(ENV_KEY))"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps --retries 1 --extra-index-url $(TORCH_INDEX) \
		"$$(grep -E '^torch==' $(LOCK))"
	$(VENV)/bin/pip install --quiet --no-deps -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	@# Guard: the CUDA-only packages that break `import vllm` on CPU must not be present.
	@! $(VENV)/bin/pip list 2>/dev/null | grep -qiE '^(torchvision|torchaudio|torchcodec|triton|nvidia-)' \
		|| { echo "CUDA-only packages found in $(VENV); remove them from $(LOCK)"; exit 1; }
	touch $@

run: $(STAMP)
	$(PY) jobs/distill.py --config jobs/configs/toy.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m 'not gpu' --runslow

lint: $(STAMP)
	$(VENV)/bin/ruff check eopd_ray jobs tests
	$(VENV)/bin/ruff format --check eopd_ray jobs tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix eopd_ray jobs tests
	$(VENV)/bin/ruff format eopd_ray jobs tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
