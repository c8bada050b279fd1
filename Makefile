# The two entry points of the README: `make bench` (the main job) and `make test`. Each installs what it needs first,
# on a fresh Debian machine as root: the apt packages, a virtualenv in .venv, and iokit with its C extension built.

# Debian's own python3 when there is one, even if another python3 comes first on PATH: it is built with PGO and LTO
# and runs Python code ~1.7x faster than a plain source build (pyenv's default: 49 vs 28 ns per call, measured), which
# every backend's figures depend on. `make PYTHON=...` picks another; `make clean` first, to rebuild .venv with it.
PYTHON      ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV        := .venv
PY          := $(VENV)/bin/python
APT_TEST    := liburing-dev gcc curl wrk apache2-utils chromium chromium-driver redis-server
APT_BENCH   := $(APT_TEST) fio
BENCH_OUT   ?= bench-results

.PHONY: all test test-all bench sanitize apt-test apt-bench build info clean

all: build

# Install only what is missing, so that a machine that has everything does not touch apt at all.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || missing="$$missing python3-venv python3-dev"; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

apt-test:
	$(call apt_install,$(APT_TEST))

apt-bench:
	$(call apt_install,$(APT_BENCH))

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

# Rebuilt when the C or its cffi declaration changes.
$(VENV)/.built: $(VENV)/.created pyproject.toml setup.py build_ffi.py $(wildcard csrc/*.c csrc/*.h)
	$(PY) -m pip install -q -e '.[test,bench]'
	@# anyio's source distribution, the installed version: tests/test_asyncio_anyio.py runs part of its suite
	$(PY) -m pip download -q --no-deps --no-binary :all: -d build/anyio-sdist \
		"anyio==$$($(PY) -c 'import importlib.metadata as m; print(m.version("anyio"))')"
	touch $@

build: apt-test $(VENV)/.built

# Two test files at a time (pytest-xdist; a file's tests stay together, so its fixtures are made once): most tests
# wait on real sockets, processes and disks, and the suite takes about half as long on this 2-core machine.
TEST_JOBS ?= -n 2 --dist loadfile

test: build
	$(PY) -m iokit info
	$(PY) -m pytest -q -m "not slow" $(TEST_JOBS)

# Everything, including the long scale, durability and fuzz runs.
test-all: build
	$(PY) -m pytest -q $(TEST_JOBS)

bench: apt-bench $(VENV)/.built
	$(PY) -m iokit.bench --quick --json $(BENCH_OUT)/bench.json --plot $(BENCH_OUT)/bench.png
	@echo "results: $(BENCH_OUT)/bench.json, plots: $(BENCH_OUT)/*.png"

# The uring tests with the extension built under AddressSanitizer and UndefinedBehaviorSanitizer.
sanitize: build
	bash scripts/sanitize.sh

info: build
	$(PY) -m iokit info

clean:
	rm -rf $(VENV) build *.egg-info iokit/_uring_ffi*.so iokit/_uring_ffi.c .pytest_cache
