# Set-up contract: `make demo` and `make test` work on a fresh machine (they install first).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,audio,demo,dev
# The verified stack everywhere; CPU-only machines (like CI) also pin the CPU torch wheel, while machines with a GPU
# take torch from wherever they get it.
CONSTRAINTS := -c constraints.txt $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
# The bytecode is compiled afterwards, on every core (`bytecode`).
PIP_INSTALL = $(PY) -m pip install --quiet --no-compile $(CONSTRAINTS)
# command[:Debian package]: what the demo needs (audio decoding, the voice question, the corpus), and what the tests
# add (speech synthesis, the browser for the app test, Java for the caption metrics)
DEMO_PACKAGES := ffmpeg flite npm
TEST_PACKAGES := $(DEMO_PACKAGES) espeak-ng sox chromium java:default-jre-headless
SYSTEM_PACKAGES ?= $(DEMO_PACKAGES)
PYTEST_ARGS ?=

.PHONY: install system-packages lmms-eval bytecode test test-slow demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints.txt constraints-cpu.txt Makefile
	$(MAKE) system-packages SYSTEM_PACKAGES="$(DEMO_PACKAGES)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade pip
	$(PIP_INSTALL) -e ".[$(EXTRAS)]"
	$(MAKE) lmms-eval
	$(MAKE) bytecode
	touch $@

# pip compiles the installed packages' bytecode one file at a time (about half of the install's time on a 2-core
# machine); compileall does it on every core. Without it, each new Python process would compile what it imports, and
# throw that away where PYTHONDONTWRITEBYTECODE is set. A file that does not compile (pip skips those too) is no error.
bytecode:
	$(PY) -m compileall -qq -j0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true

# lmms-eval for the adapter (mmphi/lmms_eval_model.py) and its test. Its declared dependencies pull torchvision, opencv,
# wandb, sentence-transformers and more that neither the adapter nor the evaluator needs; its evaluator and CLI run
# with these five. (A user can `pip install lmms-eval` as usual.)
lmms-eval:
	$(PIP_INSTALL) --no-deps lmms-eval
	$(PIP_INSTALL) loguru tenacity pytablewriter sacrebleu filelock

# Installed only when missing, and only where we may (root).
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "Please install:$$missing (e.g. sudo apt-get install$$missing)"; fi; \
	fi

# `make test` leaves out the tests marked slow (multi-process launches, torch.compile, the benchmark harnesses);
# `make test-slow` runs those, and CI runs both.
test: install
	$(MAKE) system-packages SYSTEM_PACKAGES="$(TEST_PACKAGES)"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: install
	$(MAKE) system-packages SYSTEM_PACKAGES="$(TEST_PACKAGES)"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

demo: install
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py

lint: install
	$(VENV)/bin/ruff check .

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.benchmark

clean:
	rm -rf outputs demo_runs .pytest_cache
