# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Everything lands in a local virtual environment (.venv); nothing is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= jax,torch,triton,dev,liger,verl

.PHONY: install demo test conformance conformance-third-party clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps verl==0.9.1
	touch $@

install: $(STAMP)

# The main job on the built-in default task (see README).
demo: $(STAMP)
	$(VENV)/bin/aha train

# The whole suite. The Triton kernel runs under its CPU interpreter here.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 --dist loadgroup tests
	TRITON_INTERPRET=1 $(PY) -m aha.conformance --report conformance-report.json

conformance: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m aha.conformance --report conformance-report.json

# Regenerates conformance/reports/*.json (Liger-Kernel and verl against the spec), about 2 minutes.
conformance-third-party: $(STAMP)
	$(PY) -m aha.conformance.third_party

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
