# `make test` and `make bench` set everything up on a fresh machine; `make venv` does the set-up alone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h')

.PHONY: venv test bench clean

venv: $(VENV)/.built

# hessian-eigenthings (tests and benchmarks only) exists only as pre-releases; torch is pinned again
# there so the resolver never swaps the CPU wheel for a multi-GB CUDA build.
$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --pre "hessian-eigenthings==1.0.0a5" torch==2.13.0
	touch $@

# Editable install: compiles curvkern._C in place against the venv's torch.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest tests

bench: venv
	$(PY) -m curvkern.bench

clean:
	rm -rf $(VENV) build *.egg-info curvkern/_C*.so bench-report.json bench-report.png
