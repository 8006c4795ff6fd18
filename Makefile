# Two commands do all the set-up (see README): `make demo` and `make test`.
# Both create .venv on first use and install the pinned, tested versions.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-thorough bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_flax.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Twenty times the examples per property, with fresh random inputs each run.
test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_stack.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
