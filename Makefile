# One-command set-up and the project's entry points. Everything runs inside .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/cpu.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements/torchrec.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, pyarrow; print('torch', torch.__version__, '| torchrec', torchrec.__version__, '| pyarrow', pyarrow.__version__)"

demo:
	$(BIN)/recsys-codistill demo --out runs/demo

# Fast tier: everything except tests marked slow. CI runs `make test`.
test:
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all:
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

bench:
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint:
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
