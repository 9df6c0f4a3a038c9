# The two commands a new user needs on a fresh Debian machine:
#   make demo   - install everything, then run the two-party clean room demo
#   make test   - install everything, then run the whole test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config gcc python3-venv python3-dev postgresql sqlite3 systemd
PYTEST_ARGS ?=

.PHONY: setup deb venv azurite protos check-protos proto-baseline lint typecheck test test-fast demo bench clean

setup: deb venv azurite

# Azurite (the Azure Storage emulator) for the blob tests, in a project-local npm prefix.
AZURITE_VERSION ?= 3.35.0
AZURITE := .cache/azurite/node_modules/.bin/azurite-blob
$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix .cache/azurite azurite@$(AZURITE_VERSION)

azurite: $(AZURITE)

# Installs the Debian packages the project needs when any is missing (needs root or sudo).
# dpkg-query, not dpkg -s: a removed but not purged package (state "rc") counts as missing.
deb:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,broker,azure,example]'
	@touch $@

venv: $(VENV)/.installed

protos: venv
	PATH=$(VENV)/bin:$$PATH scripts/gen_protos.sh

check-protos: venv
	PATH=$(VENV)/bin:$$PATH scripts/check_protos.sh

# Records the current contract as the compatibility baseline that check-protos holds it to. Only
# for a deliberate, announced break (normally a new package, cleanroom.v2, is the way).
proto-baseline: venv
	$(VENV)/bin/buf build --exclude-source-info -o '-#format=json' | $(VENV)/bin/python -m json.tool > .ci/proto-baseline.json

lint: venv check-protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup check-protos
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The unit tests alone, without the slow multi-GiB streams.
test-fast: setup
	$(VENV)/bin/pytest -m "not slow" tests/unit $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/cleanroom demo

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
