# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev,hbase,spark,root
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test lint typecheck unit activemq clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

## Run the main job end to end on the embedded defaults (SQLite catalog, local store).
demo: install
	$(BIN)/eventindex demo

## Lint, type-check and run every test (unit, integration, spark, slow).
test: install activemq lint typecheck unit

unit: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The integration tests run a real ActiveMQ broker: Debian's package, installed
# when we are root and it is missing.
activemq:
	@if [ ! -e /usr/share/activemq/bin/activemq.jar ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's activemq package"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq activemq >/dev/null; \
	  else \
	    echo "activemq is not installed and we are not root: broker tests will be skipped"; \
	  fi; \
	fi

clean:
	rm -rf var/demo var/bench .pytest_cache .mypy_cache .ruff_cache
