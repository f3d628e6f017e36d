# mreaper: `make run` starts mreaper on its built-in defaults, `make test` runs every test.
# Both set up .venv (and the Debian packages the tests need) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench clean deps install uninstall man deb

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,metrics,bench]'
	touch $(STAMP)

deps:
	./scripts/install-deps

run: $(STAMP)
	$(BIN)/mreaper run

test: $(STAMP) deps
	$(BIN)/ruff check
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/kill_to_free.py

# man pages, docs/configuration.md, the packaged default configuration and the shell
# completions, generated from the parser and mreaper.config_schema (a test checks that
# they are up to date)
man: $(STAMP)
	$(BIN)/python scripts/gen_docs.py

# dist/mreaper_<version>_all.deb (debian/, dh-python/pybuild), checked by lintian in
# tests/real/test_deb.py
deb:
	./scripts/install-deps --deb
	./scripts/build-deb

PREFIX ?= /opt/mreaper

install:
	./contrib/install.sh --prefix $(PREFIX)

uninstall:
	./contrib/install.sh --uninstall --prefix $(PREFIX)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
