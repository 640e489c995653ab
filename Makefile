# `make demo` and `make test` set up .venv on first use, then run the main job or the tests.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e ".[train,bench,dev,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kninfer demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check kninfer train export bench tests

clean:
	rm -rf $(VENV) demo-out
