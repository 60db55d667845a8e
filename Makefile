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
	rm -rf $(DEMO_DIR)
	$(BIN)/tessphot simulate $(DEMO_DIR)/sim --cadences 100 --size 128 128 --seed 1
	$(BIN)/tessphot prepare $(DEMO_DIR)/sim/ffi --catalog $(DEMO_DIR)/sim/catalog.csv --cache $(DEMO_DIR)/cache
	$(BIN)/tessphot todo $(DEMO_DIR)/cache
	$(BIN)/tessphot run $(DEMO_DIR)/cache --output $(DEMO_DIR)/lightcurves
	$(BIN)/tessphot status $(DEMO_DIR)/cache
	$(BIN)/tessphot star $$($(BIN)/python -c "import sqlite3; print(sqlite3.connect('$(DEMO_DIR)/cache/todo.sqlite').execute('SELECT starid FROM todolist WHERE tmag > 9 ORDER BY priority LIMIT 1').fetchone()[0])") \
		--cache $(DEMO_DIR)/cache --output $(DEMO_DIR)/debug_star --plot --json > $(DEMO_DIR)/debug_star.json
	@echo
	@echo "Simulated FFIs and truth:  $(DEMO_DIR)/sim"
	@echo "FFI cache and todo list:   $(DEMO_DIR)/cache"
	@echo "Light curves (FITS):       $(DEMO_DIR)/lightcurves  ($$(find $(DEMO_DIR)/lightcurves -name '*_lc.fits' | wc -l) files)"
	@echo "CCD summary (CDPP vs Tmag): $$(ls $(DEMO_DIR)/lightcurves/summary/*_cdpp.png)"
	@echo "Co-trending vectors:       $$(ls $(DEMO_DIR)/lightcurves/cbv/*_cbv.fits 2>/dev/null || echo 'none (no systematic above the noise)')"
	@echo "Plots of one star:         $$(dirname $$(find $(DEMO_DIR)/debug_star -name stamp.png))"
	@echo "  $$(cd $$(dirname $$(find $(DEMO_DIR)/debug_star -name stamp.png)) && ls *.png | tr '\n' ' ')"

test: $(INSTALLED)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests

benchmarks: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e '.[benchmarks]'
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python tess-backdrop==0.1.6
	test -x .venv-psfmachine/bin/python || $(PYTHON) -m venv .venv-psfmachine
	.venv-psfmachine/bin/python -m pip install --quiet psfmachine==1.1.4
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
