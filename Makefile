# The README's two commands: `make demo` and `make test`. Both create the virtual
# environment in .venv on first use and install the package into it.
# `make test-mcore-latest` runs the same tests on the newest megatron-core (Python 3.12,
# in .venv312); CI runs it after `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
# The newest megatron-core lane: megatron-core >= 0.17 needs Python 3.12.
MCORE_LATEST := 0.19.2
TORCH_LATEST := 2.14.1
VENV312 := .venv312
PY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.installed

.PHONY: demo test test-mcore-latest install lint bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --save $(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest tests -m "not gpu" -q

# A Python 3.12 interpreter: python3.12 on PATH if it runs (a pyenv shim may not), else
# pyenv's newest 3.12 (`pyenv root`, or ~/.pyenv when pyenv is not on PATH).
# PyPI's torch 2.14.1 is a CUDA build that runs on the CPU; it brings triton, which
# megatron-core 0.19's pipeline schedules import (a torch without triton cannot run them).
$(STAMP312): setup.py
	@if ! test -x $(PY312); then \
	  py=""; \
	  if python3.12 -c "" >/dev/null 2>&1; then py=python3.12; \
	  else \
	    root=$$(pyenv root 2>/dev/null || echo "$$HOME/.pyenv"); \
	    py=$$(ls -d "$$root"/versions/3.12*/bin/python 2>/dev/null | sort -V | tail -n 1); \
	  fi; \
	  if test -z "$$py"; then \
	    echo "make test-mcore-latest needs Python 3.12 (megatron-core $(MCORE_LATEST) requires it):" \
	      "no runnable python3.12 on PATH and no versions/3.12*/bin/python under $$root" >&2; \
	    exit 1; \
	  fi; \
	  echo "creating $(VENV312) with $$py"; \
	  "$$py" -m venv $(VENV312); \
	fi
	$(PY312) -m pip install --quiet --upgrade pip
	$(PY312) -m pip install --quiet torch==$(TORCH_LATEST) megatron-core==$(MCORE_LATEST) -e ".[dev]"
	touch $(STAMP312)

test-mcore-latest: $(STAMP312)
	$(PY312) -m pytest tests -m "not gpu" -q

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_rl tests tools benchmarks pretrain_rl.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs build *.egg-info
