# `make demo` and `make test` work on a fresh machine: they build .venv and install what is needed.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test soak lint typecheck guests qemu nettools clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py src/livemig/native/faultpath.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# QEMU is the benchmark baseline and is used by one boot test; best effort, tests skip without it.
qemu:
	@command -v qemu-system-x86_64 >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null) ; } || \
	  echo "note: qemu-system-x86_64 not installed; QEMU tests and baselines will be skipped"

# The network lab (livemig netlab, tests/test_net.py) needs ip, bridge, tc and ping; best effort.
nettools:
	@command -v ping >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iputils-ping >/dev/null) ; } || \
	  echo "note: iproute2/iputils-ping not installed; network tests will be skipped"

demo: setup
	$(VENV)/bin/livemig demo

lint: setup
	$(VENV)/bin/ruff check src tests

typecheck: setup
	$(VENV)/bin/mypy src

test: setup qemu nettools lint typecheck
	$(VENV)/bin/pytest -q

soak: setup
	LIVEMIG_SOAK=1000 $(VENV)/bin/pytest -q -m soak tests/test_listener_resources.py

# Guest images are committed; rebuilding needs gcc (x86) and gcc-aarch64-linux-gnu (arm64).
guests:
	$(MAKE) -C guests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
