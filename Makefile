# imagegen-serve developer entry points. `make run` serves the tiny random-weight model; `make test`
# is what CI runs (.ci/run). Everything installs into .venv; CLI tools for the deploy checks into .tools/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed before the package so the `server` extra's `torch>=2.4` is already met and
# pip never pulls the multi-GB CUDA wheels on a CPU machine. Elsewhere, point TORCH_INDEX at
# https://download.pytorch.org/whl/cpu (CPU) or leave it empty on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
MODEL_DIR ?= .cache/tiny-model
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9090
HTTP_PORT ?= 8000
PYTEST_ARGS ?=
# Extra options for the benchmarks, e.g. BENCH_ARGS="--device cuda --resolution 1024x1024".
BENCH_ARGS ?=
# `make gpu-check`: where the run goes, and its options (GPU_CHECK_ARGS="--device cpu": the dry run).
GPU_CHECK_OUT ?= bench/results/gpu-check
GPU_CHECK_ARGS ?=

.PHONY: install run test lint proto docs bench bench-adapters bench-variants bench-edits bench-tenants bench-mfu \
	gpu-check gpu-check-docs tools clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[server,cli,dev]"
	touch $@

$(MODEL_DIR)/model_index.json: | install
	$(BIN)/imagegen-server tiny-model $(MODEL_DIR)

run: install $(MODEL_DIR)/model_index.json
	$(BIN)/imagegen-server serve --model $(MODEL_DIR) --host $(HOST) --port $(PORT) \
		--metrics-port $(METRICS_PORT) --http-port $(HTTP_PORT)

tools:
	scripts/install-tools.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/buf lint
	scripts/buf-breaking.sh $(BIN)/buf

test: install tools lint
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

proto: install
	$(BIN)/python scripts/protogen.py

docs: install
	$(BIN)/python scripts/configdoc.py

# The batching benchmark (under 15 min on 2 cores), the adapter benchmark (about 6 min), the
# Edit-Plus one (reference images) and the engine against the hardware peak (MFU; made for a
# GPU, where it uses the full-size model).
bench: install
	$(BIN)/python -m bench batching $(BENCH_ARGS)

bench-adapters: install
	$(BIN)/python -m bench adapters $(BENCH_ARGS)

bench-variants: install
	$(BIN)/python -m bench variants $(BENCH_ARGS)

bench-edits: install
	$(BIN)/python -m bench edits $(BENCH_ARGS)

bench-tenants: install
	$(BIN)/python -m bench tenants-live $(BENCH_ARGS)

bench-mfu: install
	$(BIN)/python -m bench mfu $(BENCH_ARGS)

# The GPU path in one bounded run (9 minutes on CUDA; docs/gpu.md#the-gpu-check). No `install`:
# the GPU machine runs the checkout with its own torch and the wheels carried in .wheels/.
# Its results refresh docs/gpu.md's GPU section; `gpu-check-docs` redoes that from the JSON.
gpu-check:
	scripts/gpu-check.sh $(GPU_CHECK_OUT) --docs $(GPU_CHECK_ARGS)

gpu-check-docs: install
	$(BIN)/python -m bench gpu-check docs

clean:
	rm -rf $(VENV) .cache .tools .pytest_cache .mypy_cache .ruff_cache
