# Two commands do everything on a fresh machine:  make run  |  make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HNSWLIB_NO_NATIVE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled

.PHONY: run test fuzz lint loadtest chaos soak bench-hnsw bench-gpu bench-scale clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve,dev]'
	touch $(STAMP)

# The page's browser test drives Debian's Chromium through its driver (tests/integration/test_page.py).
BROWSER := /usr/bin/chromedriver
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)
APT     := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

$(BROWSER):
	$(APT) install -y -q chromium chromium-driver || ($(APT) update -q && $(APT) install -y -q chromium chromium-driver)

run: $(STAMP)  ## serve the default demo on 127.0.0.1:8000 (DATA=path FORMAT=csv|movielens|lightgcn to bring your own)
	$(BIN)/rec serve $(if $(DATA),--data $(DATA) --format $(or $(FORMAT),csv)) $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP) $(BROWSER)  ## the whole suite: unit, wiring (Serve local mode), integration (local Ray + HTTP)
	$(BIN)/python -m pytest tests -q

fuzz: $(STAMP)  ## schemathesis against the API: 300 cases per operation and 100 stateful sequences (make test: 15 and 5)
	REC_FUZZ_EXAMPLES=300 $(BIN)/python -m pytest tests/integration/test_access.py -q -s -k "fuzzed or stateful"

lint: $(STAMP)
	$(BIN)/ruff check rec deployments tests loadtest
	$(BIN)/ruff format --check rec deployments tests loadtest

loadtest: $(STAMP) $(BROWSER)  ## start a local stack, run bounded scenarios on 127.0.0.1 (<= 15 min), stop it; loadtest/results/
	$(BIN)/python -m loadtest.run $(if $(DATA),--data $(DATA) --format $(or $(FORMAT),csv)) $(if $(CONFIG),--config $(CONFIG)) $(LOADTEST_ARGS)

chaos: $(STAMP)  ## one fault at a time under mixed load (replica, log, shard, trainer, proxy killed), fused and split; loadtest/results/chaos.md (CHAOS_ARGS="--only fused/log")
	$(BIN)/python -m loadtest.chaos $(CHAOS_ARGS)

soak: $(STAMP)  ## 20 minutes of mixed load with periodic retrains: errors, lost events, every process's RSS slope; loadtest/results/soak.md (SOAK_ARGS="--minutes 5")
	$(BIN)/python -m loadtest.soak $(SOAK_ARGS)

bench-hnsw: $(STAMP)  ## 1M x 64 HNSW over 2 shard actors: build, memory, latency, recall@100, churn (ITEMS=20000 for a smoke run)
	$(BIN)/python -m loadtest.hnsw_shards $(if $(ITEMS),--items $(ITEMS))

bench-scale: $(STAMP)  ## costs against data size at 0.1 and 1 x (1M users, 100k items, 20M events): ingest, retrain, checkpoint, start-up, swap, memory, recommend p50/p99 (SCALE=0.1 for the tenth alone)
	$(BIN)/python -m loadtest.scale $(if $(SCALE),--scale $(SCALE))

bench-gpu: $(STAMP)  ## ranker candidates/s at 1/16/128 x 500 on CPU, and on CUDA when present
	$(BIN)/python -m loadtest.gpu_ranker $(GPU_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
