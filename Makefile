# Set-up and entry points. `make demo` and `make test` are all a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo test test-slow gpu-check lint bench bench-quick bench-arch readme-demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch/torchvision first so pip takes the pinned local wheels, then the project.
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/compress pipeline configs/demo.yaml

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

# The tests marked gpu (TensorRT engines, CUDA runtimes). Needs an NVIDIA GPU and the gpu extra:
# $(BIN)/pip install -e '.[gpu]'. Without them every test reports why it was skipped.
gpu-check: install
	$(BIN)/pytest -q -m gpu -rs

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

bench-arch: install
	$(BIN)/python -m benchmarks.run --arch

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache

# Re-run the demo and rewrite the README's demo figures and example summary.json from it.
readme-demo: install
	$(BIN)/compress pipeline configs/demo.yaml --fresh
	$(BIN)/python -m benchmarks.readme runs/demo
