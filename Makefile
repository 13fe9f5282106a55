# `make test` and `make bench` set everything up on a fresh machine; `make venv` does the set-up alone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h')

.PHONY: venv test test-fast test-isa bench lint format clean cross-compiler

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

# The whole suite (slow cases and every hypothesis example included) in two worker processes, then the
# fused-vs-eager tests once per CPU code path (test-isa). The multi-process tests spend most of their time in
# their ranks, so two workers keep `make test` within 15 minutes of a fresh clone on 2 cores; a worker that
# runs out of tests takes queued ones from the other (worksteal), so a long test late in a queue does not
# leave a core idle.
test: venv cross-compiler
	$(PY) -m pytest -n 2 --dist worksteal tests
	$(PY) tests/isa_matrix.py

# Every family and backend on small shapes: no `slow` cases, a quarter of the hypothesis examples, two
# worker processes.
test-fast: venv
	HYPOTHESIS_PROFILE=fast $(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

# The fused-vs-eager tests under each CURVKERN_CPU_CAPABILITY x ATEN_CPU_CAPABILITY this CPU can run.
test-isa: venv
	$(PY) tests/isa_matrix.py

# The aarch64 cross compiler tests/test_portability.py checks the kernels' aarch64 code with; installed
# with apt-get when run as root, else the command is printed (the tests skip without it, fail under CI=true).
cross-compiler:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu) >/dev/null \
	      || echo "could not install g++-aarch64-linux-gnu; the aarch64 checks will skip"; \
	  else \
	    echo "the aarch64 checks need a cross compiler: sudo apt-get install g++-aarch64-linux-gnu"; \
	  fi; }

# Lint and format with the versions pinned in requirements-dev.txt. They need the tools, not the
# compiled extension, so they depend on the venv's packages only.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

# The fixes first, as ruff advises (an import the fixer moves may need formatting); what it cannot fix
# is printed and left to `make lint` to fail on.
format: $(VENV)/.deps
	$(VENV)/bin/ruff check --fix --exit-zero .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CSRC)

bench: venv
	$(PY) -m curvkern.bench

clean:
	rm -rf $(VENV) build *.egg-info curvkern/_C*.so bench-report.json bench-report.png
