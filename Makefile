# Set-up and entry points. `make demo` and `make test` are all a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install install-gpu demo test test-slow gpu-check gpu-smoke wheels lint bench bench-quick bench-arch bench-matrix bench-int8 bench-latency bench-equal-latency bench-matched-speed bench-matched-speed-hard bench-fingerprint readme-demo docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The tested torch/torchvision pair first (pyproject.toml allows their minor releases), then the project.
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev,hf]'
	touch $(STAMP)

demo: install
	$(BIN)/compress pipeline configs/demo.yaml

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

# On a CUDA machine: the gpu extra (onnxruntime-gpu, TensorRT 10). onnxruntime (CPU, a base dependency) and
# onnxruntime-gpu install into the same onnxruntime/ folder; the GPU wheel is reinstalled last so that its files
# are the ones in place. Never uninstall either afterwards: that deletes the shared files.
install-gpu: install
	$(BIN)/pip install -e '.[dev,gpu]'
	$(BIN)/pip install --force-reinstall --no-deps "onnxruntime-gpu==$$($(BIN)/python -c \
		'from importlib.metadata import version; print(version("onnxruntime-gpu"))')"

# The tests marked gpu (TensorRT engines, ONNX Runtime CUDA). COMPRESS_REQUIRE_GPU=1 turns every skip into a
# failure, so a nightly job that lost its GPU or TensorRT goes red instead of passing having tested nothing.
gpu-check: install-gpu
	COMPRESS_REQUIRE_GPU=1 $(BIN)/pytest -q -m gpu -rs

# A few minutes on a CUDA machine with torch (CUDA build), timm, onnx and onnxruntime but possibly neither TensorRT
# nor onnxruntime-gpu and no package index: the pipeline on CUDA with a speedup target and the gpu tests, with what
# ran and what was skipped. It uses the interpreter as it is (PY), installing what is missing from WHEELS.
gpu-smoke:
	$(PY) scripts/gpu_smoke.py $(if $(WHEELS),--wheels $(WHEELS)) $(if $(OUT),--out $(OUT))

# On a connected machine of the GPU machine's platform and Python: the exact versions installed here, as wheels,
# minus torch and its CUDA libraries (the GPU machine brings its own): copy wheels/ over and run gpu-smoke there.
wheels: install
	$(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|torchvision|triton|nvidia-|cuda-)' > wheels.txt
	$(BIN)/pip download --dest wheels --no-deps -r wheels.txt

bench: install
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.run --int8
	$(BIN)/python -m benchmarks.run --latency-target
	$(BIN)/python -m benchmarks.run --equal-latency
	$(BIN)/python -m benchmarks.run --matched-speed
	$(BIN)/python -m benchmarks.run --matched-speed-hard
	$(BIN)/python -m benchmarks.run --fingerprint

bench-int8: install
	$(BIN)/python -m benchmarks.run --int8

bench-latency: install
	$(BIN)/python -m benchmarks.run --latency-target

bench-equal-latency: install
	$(BIN)/python -m benchmarks.run --equal-latency

bench-matched-speed: install
	$(BIN)/python -m benchmarks.run --matched-speed

bench-matched-speed-hard: install
	$(BIN)/python -m benchmarks.run --matched-speed-hard

bench-fingerprint: install
	$(BIN)/python -m benchmarks.run --fingerprint

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

bench-arch: install
	$(BIN)/python -m benchmarks.run --arch

bench-matrix: install
	$(BIN)/python -m benchmarks.run --matrix

# The configuration reference in docs/configuration.md, from the schema (a test fails when it is stale).
docs: install
	$(BIN)/python -m pipeline._reference docs/configuration.md

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache

# Re-run the demo and rewrite the README's demo figures and example summary.json from it.
readme-demo: install
	$(BIN)/compress pipeline configs/demo.yaml --fresh
	$(BIN)/python -m benchmarks.readme runs/demo
