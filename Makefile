# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# torch is pinned here (a local CPU wheel); pyproject only says torch>=2.5 so that
# pip never resolves a newer CUDA build when torch is already present.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# Bytecode is compiled when a module is first imported, not at install: pip would compile
# all of torch (about a minute of one core here) where a test run imports a fraction of it.
# That needs Python allowed to write its caches, so PYTHONDONTWRITEBYTECODE (set on some
# machines, this one included) is not passed down; without the caches every subprocess a
# test starts would compile torch's imports again.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL := $(PY) -m pip install -q --no-compile

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH_PIN)
	$(PIP_INSTALL) -e '.[dev,mnist]' $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compress demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers: the tests run one torch thread each, and CI's machine has two cores. Whole
# files per worker (loadfile): a module-scoped fixture (trained models, reference runs) is
# then built once, not once per worker; on an idle clean clone pytest took 262 s against
# 332 s with the default per-test distribution.
test: $(STAMP) lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile -p no:logging

clean:
	rm -rf $(VENV) build *.egg-info
