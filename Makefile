# The README's two commands: `make demo` and `make test` (what CI runs). Both create .venv themselves.
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo-$(shell date +%Y%m%d-%H%M%S)
# Static ResNet-18 and Juliet-ResNet-18 on the built-in synthetic set (no download), 8 epochs each; then Table 4
# and the compute knob of the Juliet checkpoint against its baselines (curve.json, curve.png).
DEMO_FLAGS := --dataset synthetic --epochs 8 --workers 0 --quiet

.PHONY: test demo clean

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

test: $(VENV)/.installed  # two worker processes (pytest-xdist), one thread each: CI has 2 cores
	$(PY) -m pytest -q -n 2 --dist worksteal

demo: $(VENV)/.installed
	$(PY) train_cifar.py $(DEMO_FLAGS) --static --out $(DEMO)/static
	$(PY) train_cifar.py $(DEMO_FLAGS) --out $(DEMO)/juliet
	$(PY) profile.py --table $(DEMO)/static $(DEMO)/juliet --out $(DEMO)/top1_per_gflop.png
	$(PY) profile.py $(DEMO)/juliet --curve --baseline $(DEMO)/static

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
