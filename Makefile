# Two commands on a fresh machine:  `make demo` (the main job) and `make test`.
# Both create .venv on first use (numpy, Cython, Jinja2, pytest; torch only as the
# test oracle) and build convgen in place; later runs rebuild only what changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := setup.py pyproject.toml $(wildcard codegen/*.py templates/* convgen/*.pyx convgen/include/*.h)

.PHONY: demo test bench bench-quick build clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"

$(VENV)/.built: $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

build: $(VENV)/.built

demo: $(VENV)/.built
	$(BIN)/python -m convgen.demo

test: $(VENV)/.built
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.built
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m bench

bench-quick: $(VENV)/.built
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m bench --quick

clean:
	rm -rf build convgen/_generated convgen/*.c convgen/*.so $(VENV)
