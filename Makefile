# The README's two commands: `make demo` and `make test`. Both create the virtual
# environment in .venv on first use and install the package into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: demo test install lint bench clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_rl tests tools benchmarks pretrain_rl.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs build *.egg-info
