# Set-up and main jobs. Everything runs inside .venv, created on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Use the data copy beside the checkout when there is one; otherwise dni downloads to its cache.
export DNI_DATA_DIR ?= $(if $(wildcard ../shared/data/mnist),$(abspath ../shared/data),)
export MPLCONFIGDIR := $(abspath .cache/matplotlib)

.PHONY: venv test smoke clean

$(BIN)/dni: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/dni

venv: $(BIN)/dni

test: venv
	$(BIN)/cffconvert --validate -i CITATION.cff
	$(BIN)/python -m pytest -q

smoke: venv
	bash scripts/smoke.sh

clean:
	rm -rf $(VENV) .cache build *.egg-info
