# napari-mg3d: `make demo` runs MG-3D end to end on a generated sample; `make test` runs the tests.
# Both create .venv if missing and install into it (torch 2.13.0 CPU first, then the package).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install sysdeps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

# Xvfb and the xcb libraries Qt needs for the GUI tests (Debian; installs only what is missing, as root).
sysdeps:
	@bash .ci/sysdeps.sh

demo: $(STAMP) sysdeps
	$(PY) -m napari_mg3d.demo

test: $(STAMP) sysdeps
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) mg3d_demo_output .pytest_cache
