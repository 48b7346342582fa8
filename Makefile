# The README's two commands: `make test` (what CI runs) and `make demo`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q test_juliet.py

clean:
	rm -rf $(VENV) runs .pytest_cache __pycache__
