# The two commands a user needs: `make demo` and `make test`.
# Both create the virtual environment on first use and install the package into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: demo test benchmarks clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dask]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/tessphot simulate $(DEMO_DIR)/sim --cadences 60 --size 128 128 --seed 1
	$(BIN)/tessphot prepare $(DEMO_DIR)/sim/ffi --catalog $(DEMO_DIR)/sim/catalog.csv --cache $(DEMO_DIR)/cache
	@echo "Simulated FFIs:  $(DEMO_DIR)/sim/ffi"
	@echo "Cache:           $(DEMO_DIR)/cache"

test: $(INSTALLED)
	$(BIN)/python -m pytest -n 2 -q tests

benchmarks: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e '.[benchmarks]'
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
