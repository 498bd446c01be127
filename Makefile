# Entry points for building, testing, benchmarking and demonstrating egtunnel; `make help` lists them.
# Stamps inside .venv make a repeated `make test` skip what is already installed and built.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VENV_PY := $(CURDIR)/$(VENV)/bin/python
VENV_STAMP := $(VENV)/.stamp-venv
BUILD_STAMP := $(VENV)/.stamp-build
RUST_SOURCES := $(shell find src -name '*.rs' 2>/dev/null)
PYTEST_ARGS ?=

# rustup installs cargo here without touching PATH for non-login shells such as make's.
export PATH := $(HOME)/.cargo/bin:$(PATH)

# `cargo test` links libpython (the extension-module feature is off there). pyo3 sets no rpath, so
# without LD_LIBRARY_PATH the test binary silently loads whatever libpython the system has, possibly
# another patch release than the venv's interpreter, or fails to start when there is none.
CARGO_ENV = PYO3_PYTHON=$(VENV_PY) \
	LD_LIBRARY_PATH="$$($(VENV_PY) -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}"

# The build requirement (maturin) and the `test` extra, read from pyproject.toml so that the list
# lives in one place.
define REQUIREMENTS_PY
try:
    import tomllib
except ImportError:
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)
print("\n".join(meta["build-system"]["requires"] + meta["project"]["optional-dependencies"]["test"]))
endef
export REQUIREMENTS_PY

# Finds what the build and the tests need from the system; as root installs it with apt-get,
# otherwise says how. The distro's ssh service must not come up on port 22 as a side effect: the
# tests start their own servers.
define DEPS_SH
set -e
have() { command -v "$$1" >/dev/null 2>&1; }
missing=""
[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"
have ssh && have ssh-keygen || missing="$$missing openssh-client"
have ip && have ss || missing="$$missing iproute2"
have ps || missing="$$missing procps"
have iptables || missing="$$missing iptables"
have pkg-config || missing="$$missing pkg-config"
pkg-config --exists openssl 2>/dev/null || missing="$$missing libssl-dev"
have cc || missing="$$missing gcc libc6-dev"
if ! have "$(PYTHON)"; then
    missing="$$missing python3 python3-venv python3-dev"
elif [[ "$$(readlink -f "$$(command -v "$(PYTHON)")")" == /usr/bin/* ]]; then
    # A distro Python splits venv support and the linkable libpython into separate packages.
    "$(PYTHON)" -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"
    "$(PYTHON)" -c 'import os, sys, sysconfig as s; sys.exit(not os.path.exists(os.path.join(s.get_config_var("LIBDIR"), s.get_config_var("LDLIBRARY"))))' \
        || missing="$$missing python3-dev"
fi
if ! have cargo; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs), then run make again" >&2
    exit 1
fi
[ -z "$$missing" ] && exit 0
if [ "$$(id -u)" != 0 ] || ! have apt-get; then
    echo "missing system packages:$$missing" >&2
    echo "install them as root, e.g.: sudo apt-get install -y --no-install-recommends$$missing" >&2
    exit 1
fi
had_sshd=0; [ -x /usr/sbin/sshd ] && had_sshd=1
policy=/usr/sbin/policy-rc.d
if [ ! -e "$$policy" ]; then
    # Tells the package scripts not to start services during the install.
    printf '#!/bin/sh\nexit 101\n' > "$$policy"; chmod 755 "$$policy"
    trap 'rm -f "$$policy"' EXIT
fi
echo "installing:$$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends $$missing
if [ "$$had_sshd" = 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
    elif have service; then
        service ssh stop >/dev/null 2>&1 || true
    fi
fi
endef
export DEPS_SH

.PHONY: help deps venv build cargo-test pytest test demo bench soak scale lint clean distclean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-11s %s\n", $$1, $$2}'

deps: ## Check system packages (sshd, iproute2, OpenSSL headers, ...); install the missing ones with apt-get as root
	@bash -c "$$DEPS_SH"

venv: $(VENV_STAMP) ## Create .venv with maturin and the `test` extra of pyproject.toml

$(VENV)/bin/python: | deps
	$(PYTHON) -m venv $(VENV)

$(VENV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV_PY) -c 'import tomllib' 2>/dev/null || $(VENV_PY) -m pip install -q tomli
	$(VENV_PY) -c "$$REQUIREMENTS_PY" > $(VENV)/requirements-test.txt
	$(VENV_PY) -m pip install -q -r $(VENV)/requirements-test.txt
	touch $@

build: $(BUILD_STAMP) ## Build the extension in release mode into .venv (maturin develop --release)

$(BUILD_STAMP): $(VENV_STAMP) Cargo.toml $(wildcard Cargo.lock) pyproject.toml $(RUST_SOURCES) | deps
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release
	touch $@

cargo-test: $(VENV_STAMP) ## Run the Rust unit tests, linked against the venv's Python
	$(CARGO_ENV) cargo test

pytest: $(BUILD_STAMP) ## Run the Python tests (pass options with PYTEST_ARGS="-k name")
	$(VENV_PY) -m pytest -q -rs $(PYTEST_ARGS)

test: deps build ## Install what is missing, build, then run cargo test and pytest (what CI runs)
	$(CARGO_ENV) cargo test
	$(VENV_PY) -m pytest -q -rs $(PYTEST_ARGS)

demo: deps build ## Run examples/demo.py
	$(VENV_PY) examples/demo.py

bench: deps build ## Run the benchmarks (bench/run.py)
	$(VENV_PY) bench/run.py

scale: deps build ## A gateway with 100 kernels: egtunnel against tunneling off (bench/scale.py)
	$(VENV_PY) bench/scale.py $(SCALE_ARGS)

soak: deps build ## Reliability run: real gateway, two stock-sshd hosts, 40+20 kernels at once, 200 cycles
	$(VENV_PY) bench/soak.py $(SOAK_ARGS)

lint: $(BUILD_STAMP) ## cargo clippy, and mypy.stubtest of the stubs when mypy is in .venv
	@if cargo clippy --version >/dev/null 2>&1; then \
		echo "cargo clippy --all-targets -- -D warnings"; $(CARGO_ENV) cargo clippy --all-targets -- -D warnings; \
	else echo "cargo clippy not installed: skipped"; fi
	@if $(VENV_PY) -c 'import mypy' 2>/dev/null; then \
		echo "python -m mypy.stubtest egtunnel._native"; $(VENV_PY) -m mypy.stubtest egtunnel._native; \
	else echo "mypy not installed in $(VENV): stubtest skipped"; fi

clean: ## Remove build outputs and caches (keeps .venv's installed packages)
	rm -rf target .pytest_cache $(BUILD_STAMP)
	rm -f python/egtunnel/*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## Also remove .venv: back to the state of a fresh clone
	rm -rf $(VENV)
