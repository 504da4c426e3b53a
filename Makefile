# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both run the set-up first (idempotent: a stamp file skips it when pyproject.toml is unchanged).
VENV   := .venv
STAMP  := $(VENV)/.probex-installed
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/probex demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python scripts/benchmark.py

clean:
	rm -rf .probex .pytest_cache
