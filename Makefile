# The two commands:  make demo  (run the main job)   make test  (run the tests)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tdml-installed
OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test install bench clean services-up services-down

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first: the CPU build 2.13.0 lies on this machine; any other request pulls GBs of CUDA wheels.
$(STAMP): pyproject.toml $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0"
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "torchvision==0.28.0"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	infra/anvil.sh install
	infra/ipfs.sh install
	infra/postgres.sh install
	infra/chromium.sh install
	touch $(STAMP)

install: $(STAMP)

# the protocol on the embedded chain and a local store, then the audit of what it left behind
demo: $(STAMP)
	$(BIN)/tdml run examples/digits.yaml --out $(OUT)
	$(BIN)/tdml audit $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# anvil, IPFS, SeaweedFS (S3), PostgreSQL and a Prefect server with its pools, deployments and a worker, on free
# loopback ports; their addresses in .services/services.json, which `tdml run`, the workers and deployments read
services-up: $(STAMP)
	infra/services.sh up

services-down:
	infra/services.sh down

bench: $(STAMP)
	$(BIN)/python bench/chain_bench.py
	$(BIN)/python bench/flow_overhead.py

clean:
	rm -rf $(VENV) runs
