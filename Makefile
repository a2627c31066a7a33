# The two commands: `make demo` runs the loop on the embedded default, `make test` runs every test.
# Both bootstrap uv and the locked environment on a machine that has only Python and make.
SHELL := /bin/bash
PYTHON ?= python3
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --frozen --no-sync

.PHONY: env browsers demo test test-fast lint bench bench-serving bench-inference clean

# --compile-bytecode: these machines set PYTHONDONTWRITEBYTECODE=1, so without it every Python process (servers,
# workers, CLI calls, each test's subprocesses) compiled its imports from source: 13.5 s of CPU to import Feast,
# MLflow, GX, Prefect and scikit-learn, 7.7 s with the bytecode. Once per environment (~45 s), ~2 s after that.
env:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	@$(UV) sync --frozen --quiet --compile-bytecode

# The demo runs on the persistent local stack (left running: `flywheel down` stops it), with the
# rollout plan `demo` (the canary in seconds) for the rollouts this stack starts, the webhook
# receiver on a throwaway secret generated here at run time (yours, if FLYWHEEL_WEBHOOK_SECRET is set),
# and a simulated clock: one day per DEMO_SECONDS_PER_DAY wall seconds from the moment `flywheel up`
# anchors it (windows, cooldowns, staleness, outcome arrival; Prefect stays on wall time).
DEMO_SECONDS_PER_DAY ?= 600
demo: env
	export FLYWHEEL_WEBHOOK_SECRET="$${FLYWHEEL_WEBHOOK_SECRET:-$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(16))')}"; \
	export FLYWHEEL_CLOCK__KIND=simulated FLYWHEEL_CLOCK__SECONDS_PER_DAY=$(DEMO_SECONDS_PER_DAY); \
	FLYWHEEL_ROLLOUT__STRATEGY=demo $(RUN) flywheel up && $(RUN) flywheel demo

# Debian's chromium for the browser test (tests/e2e/test_ui_browser.py drives it with Playwright; Playwright's
# own browser download needs the internet). Without root or a package mirror it says so and the test skips.
browsers:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 && \
	  echo "installed chromium"; } || \
	  echo "chromium could not be installed (needs root, apt-get and a Debian mirror): the browser test skips"

# Two pytest-xdist workers (TEST_WORKERS=0 runs in one process): the suite's groups are in tests/conftest.py.
TEST_WORKERS ?= 2
test: env browsers
	$(RUN) ruff check .
	$(RUN) pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

test-fast: env
	$(RUN) pytest -q -m "not integration and not slow and not production" -x

lint: env
	$(RUN) ruff check . && $(RUN) ruff format --check .

# Every benchmark, one after another, into benchmarks/results/latest.{json,md} + latest_growth.png (about 20
# minutes on 2 cores; `make bench QUICK=1`: the correctness-only sizes, labelled quick). Run it on a quiet machine.
bench: env
	$(RUN) python -m tests.benchmarks.run_all $(if $(QUICK),--quick,)

# Flywheel's service vs feast serve + mlflow models serve, side by side (about 3 minutes; --quick: 2)
bench-serving: env
	$(RUN) python -m tests.benchmarks.bench_serving

# Inference paths per model family: sklearn pipeline vs numpy replay vs ONNX Runtime (about 2 minutes)
bench-inference: env
	$(RUN) python -m tests.benchmarks.bench_inference

clean:
	-$(RUN) flywheel down 2>/dev/null
	rm -rf data mlruns .pytest_cache
