# `make run` and `make test` work on a fresh machine: they install what they need first.
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: install run test test-slow bench lab readme
install: .installed
.installed: pyproject.toml
	$(PYTHON) -m pip install -q $(TORCH)   # first, so pip does not pull a CUDA build for the rest
	$(PYTHON) -m pip install -q -e ".[test,quant,slurm,plots,examples]"
	touch .installed

run: .installed
	$(PYTHON) run_exp.py

test: .installed          # the suite without the tests marked slow (a few minutes)
	$(PYTHON) -m pytest tests -m "not slow"

test-slow: .installed     # the slow end-to-end tests (subprocess runs, 2 processes, kill and resume, SLURM); CI runs both
	$(PYTHON) -m pytest tests -m slow

bench: .installed
	$(PYTHON) -m bench.run_all

lab: .installed           # the method lab (`--jobs 2`: ~40 min on 2 cores; `python -m peftlab.lab --quick --jobs 2`: ~10 min)
	$(PYTHON) -m peftlab.lab

readme:                   # rewrite the README's generated figures from bench/results
	$(PYTHON) -m bench.readme
