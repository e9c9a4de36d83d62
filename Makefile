# The two commands a fresh machine needs: `make demo` and `make test`.
# Each one builds the venv first (pinned by constraints.txt), so nothing else is required.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Ray test clusters must not ask for a token (see README, "Ray auth").
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint test-fast bench bench-autofaiss-venv bench-lancedb-venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,test]'
	touch $(STAMP)

demo: venv
	$(BIN)/shardex demo

test: venv lint
	$(BIN)/python -m pytest -q -ra --durations=25

# ruff's rules are in pyproject.toml; make test runs this first.
lint: venv
	$(BIN)/ruff check .

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow"

# The benchmarks under bench/ (minutes to hours; see bench/README.md) also plot.
bench: venv
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,bench]'
	$(BIN)/python bench/build_vs_single_process.py

clean:
	rm -rf $(VENV) data bench/out

# autofaiss pins numpy<2: bench/build/vs_autofaiss.py runs it from its own venv.
bench-autofaiss-venv: bench/.venv-autofaiss/.installed

bench/.venv-autofaiss/.installed:
	$(PY) -m venv bench/.venv-autofaiss
	bench/.venv-autofaiss/bin/pip install -q autofaiss==2.18.0 "pyarrow<16"
	touch $@

# LanceDB, the baseline of bench/build/refine.py --lancedb, in its own venv too.
bench-lancedb-venv: bench/.venv-lancedb/.installed

bench/.venv-lancedb/.installed:
	$(PY) -m venv bench/.venv-lancedb
	bench/.venv-lancedb/bin/pip install -q lancedb==0.40.0 numpy
	touch $@
