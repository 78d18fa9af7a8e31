# fmpsr: two commands for a fresh machine.
#   make demo   install into .venv, build the demo data, prune, finalize, fine-tune, test
#   make test   install into .venv (with test extras) and run the test suite
#   make test-fast   the same without the slow end-to-end tests (@pytest.mark.slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A pair of PyPI builds known to work together (the PyPI torchvision wheel needs the PyPI torch).
TORCH_PKGS ?= torch==2.15.0 torchvision==0.29.2

.PHONY: install demo test test-fast clean-demo

$(VENV)/.fmpsr-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PKGS)
	# basicsr's sdist imports torch in setup.py: build it against the torch installed above.
	$(PIP) install -q --no-build-isolation basicsr==1.4.2
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.fmpsr-installed

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean-demo:
	rm -rf datasets/demo experiments/fmp_lsrb_x4_demo* results/test_fmp_lsrb_x4_demo*
