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
PY_SOURCES := $(shell find python -type f -not -name '*.so' -not -path '*/__pycache__/*' 2>/dev/null)
PYTEST_ARGS ?=
# Operations of `make soak`'s stress run (bench/stress.py): echo bursts and remote commands, half each.
STRESS_OPS ?= 20000
# EG's own kernel launcher, for the end-to-end tests that compare with it (tests/e2e/conftest.py finds it here).
EG_LAUNCHER_DIR := $(VENV)/eg-launchers
EG_LAUNCHER := $(EG_LAUNCHER_DIR)/launch_ipykernel.py
# The portable wheel: one file for every CPython >= 3.9 (abi3) on any x86_64 Linux with glibc >= 2.17
# (manylinux2014), built with zig, which links against glibc 2.17's symbols whatever this machine has.
WHEEL_DIR := dist
WHEEL_STAMP := $(WHEEL_DIR)/.stamp-wheel
WHEEL_POLICY := manylinux2014
WHEEL_GLIBC := 2.17
# What the tests read to find the wheel; the wheel recipe leaves exactly one in WHEEL_DIR.
WHEEL_ENV = EGTUNNEL_WHEEL="$$(echo $(CURDIR)/$(WHEEL_DIR)/egtunnel-*.whl)"
# A git clone of the RustSec advisory database for `make audit`, which never fetches it: the check then
# says what it was made against, and runs the same offline as online.
ADVISORY_DB ?= $(HOME)/.cache/egtunnel/advisory-db
ADVISORY_DB_URL := https://github.com/rustsec/advisory-db

# rustup installs cargo here without touching PATH for non-login shells such as make's.
export PATH := $(HOME)/.cargo/bin:$(PATH)

# `cargo test` links libpython (the extension-module feature is off there). pyo3 sets no rpath, so
# without LD_LIBRARY_PATH the test binary silently loads whatever libpython the system has, possibly
# another patch release than the venv's interpreter, or fails to start when there is none.
CARGO_ENV = PYO3_PYTHON=$(VENV_PY) \
	LD_LIBRARY_PATH="$$($(VENV_PY) -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}"

# The build requirement (maturin) and the `test` and `wheel` extras, read from pyproject.toml so that
# the list lives in one place.
define REQUIREMENTS_PY
try:
    import tomllib
except ImportError:
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)
extras = meta["project"]["optional-dependencies"]
print("\n".join(meta["build-system"]["requires"] + extras["test"] + extras["wheel"]))
endef
export REQUIREMENTS_PY

# `auditwheel show` exits 0 even for a wheel no manylinux policy accepts (it then names the plain
# linux tag), so its verdict is read from the text: the wheel must be abi3 and consistent with a
# manylinux tag no newer than WHEEL_GLIBC, which also rules out any library outside the policy
# (libssl, libcrypto, libssh2 or libz from the build machine).
define WHEEL_CHECK_PY
import re, subprocess, sys
wheels = sys.argv[1:]
if len(wheels) != 1 or not wheels[0].endswith(".whl"):
    sys.exit(f"expected one wheel, found: {wheels}")
wheel = wheels[0]
if "-cp39-abi3-" not in wheel or "$(WHEEL_POLICY)_" not in wheel:
    sys.exit(f"{wheel}: not tagged cp39-abi3 and $(WHEEL_POLICY)")
report = subprocess.run(["$(VENV)/bin/auditwheel", "show", wheel], check=True, capture_output=True,
                        text=True).stdout
print(report.strip())
found = re.search(r'following\s+platform\s+tag:\s+"(\w+?)"', report)
tag = found.group(1) if found else "none"
m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag)
wanted = tuple(int(n) for n in "$(WHEEL_GLIBC)".split("."))
if not m or (int(m.group(1)), int(m.group(2))) > wanted:
    sys.exit(f"auditwheel: {wheel} is {tag}, not manylinux with glibc <= $(WHEEL_GLIBC)")
print(f"auditwheel: {tag}: ok")
endef
export WHEEL_CHECK_PY

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
# The wheel's OpenSSL is configured by perl scripts (IPC::Cmd is in Debian's full perl, not perl-base).
have perl && perl -MIPC::Cmd -e 1 2>/dev/null || missing="$$missing perl"
have make || missing="$$missing make"
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

.PHONY: help deps venv build eg-launcher wheel wheel-test cargo-test pytest test demo bench soak scale lint audit clean distclean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-11s %s\n", $$1, $$2}'

deps: ## Check system packages (sshd, iproute2, OpenSSL headers, ...); install the missing ones with apt-get as root
	@bash -c "$$DEPS_SH"

venv: $(VENV_STAMP) ## Create .venv with maturin and the `test` and `wheel` extras of pyproject.toml

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

eg-launcher: $(EG_LAUNCHER) ## Fetch EG's own launch_ipykernel.py (its source distribution) for the tests that run kernels with it

# EG's wheel leaves out its kernel launchers; its source distribution of the installed version has them.
$(EG_LAUNCHER): $(VENV_STAMP)
	rm -rf $(EG_LAUNCHER_DIR) && mkdir -p $(EG_LAUNCHER_DIR)/sdist
	$(VENV_PY) -m pip download -q --no-deps --no-binary :all: -d $(EG_LAUNCHER_DIR)/sdist \
		"jupyter_enterprise_gateway==$$($(VENV_PY) -c 'import importlib.metadata as m; print(m.version("jupyter_enterprise_gateway"))')"
	tar -xzf $(EG_LAUNCHER_DIR)/sdist/*.tar.gz -C $(EG_LAUNCHER_DIR) --strip-components=5 \
		--wildcards '*/etc/kernel-launchers/python/scripts/launch_ipykernel.py'
	rm -rf $(EG_LAUNCHER_DIR)/sdist
	test -s $@ && touch $@

wheel: $(WHEEL_STAMP) ## Build the portable wheel (manylinux2014, abi3, OpenSSL and libssh2 built in) into dist/; check it with auditwheel

# maturin runs zig as `python3 -m ziglang`, from PATH. Variables that would make the -sys crates link a
# system OpenSSL, libssh2 or zlib instead of the copies they build are removed for this one command.
$(WHEEL_STAMP): $(VENV_STAMP) Cargo.toml $(wildcard Cargo.lock) pyproject.toml README.md $(RUST_SOURCES) $(PY_SOURCES) | deps
	rm -f $(WHEEL_DIR)/egtunnel-*.whl $@
	env -u OPENSSL_NO_VENDOR -u LIBSSH2_SYS_USE_PKG_CONFIG -u LIBZ_SYS_STATIC \
		PATH=$(CURDIR)/$(VENV)/bin:$$PATH VIRTUAL_ENV=$(CURDIR)/$(VENV) \
		$(VENV)/bin/maturin build --release --zig --compatibility $(WHEEL_POLICY) \
		--features extension-module,portable --out $(WHEEL_DIR)
	$(VENV_PY) -c "$$WHEEL_CHECK_PY" $(WHEEL_DIR)/egtunnel-*.whl
	touch $@

wheel-test: $(WHEEL_STAMP) ## Install the wheel into a fresh virtualenv outside the checkout; run a gateway and a kernel from it
	$(WHEEL_ENV) $(VENV_PY) -m pytest -q -rs tests/e2e/test_wheel.py

cargo-test: $(VENV_STAMP) ## Run the Rust unit tests, linked against the venv's Python
	$(CARGO_ENV) cargo test

pytest: $(BUILD_STAMP) $(EG_LAUNCHER) ## Run the Python tests (pass options with PYTEST_ARGS="-k name")
	$(VENV_PY) -m pytest -q -rs $(PYTEST_ARGS)

test: deps build wheel eg-launcher ## Install what is missing, build, then run cargo test and pytest, the wheel's smoke included (what CI runs)
	$(CARGO_ENV) cargo test
	$(WHEEL_ENV) $(VENV_PY) -m pytest -q -rs $(PYTEST_ARGS)

demo: deps build ## Run examples/demo.py
	$(VENV_PY) examples/demo.py

bench: deps build ## Run the benchmarks (bench/run.py)
	$(VENV_PY) bench/run.py

scale: deps build ## A gateway with 100 kernels: egtunnel against tunneling off (bench/scale.py)
	$(VENV_PY) bench/scale.py $(SCALE_ARGS)

soak: deps build ## Reliability runs: 20,000 operations on one shared connection (bench/stress.py), then a real gateway with 40+20 kernels and 200 cycles (bench/soak.py)
	mkdir -p bench/results
	$(VENV_PY) bench/stress.py --ops $(STRESS_OPS) --max-p99-ratio 1.5 --json bench/results/stress.json
	$(VENV_PY) bench/soak.py $(SOAK_ARGS)

lint: $(BUILD_STAMP) ## cargo clippy, and mypy.stubtest of the stubs when mypy is in .venv
	@if cargo clippy --version >/dev/null 2>&1; then \
		echo "cargo clippy --all-targets -- -D warnings"; $(CARGO_ENV) cargo clippy --all-targets -- -D warnings; \
	else echo "cargo clippy not installed: skipped"; fi
	@if $(VENV_PY) -c 'import mypy' 2>/dev/null; then \
		echo "python -m mypy.stubtest egtunnel._native"; $(VENV_PY) -m mypy.stubtest egtunnel._native; \
	else echo "mypy not installed in $(VENV): stubtest skipped"; fi

# Advisory: without a database it says how to get one and succeeds, so a machine without one (CI) does
# not fail for it; with one, any advisory not accepted in .cargo/audit.toml fails the target.
audit: ## Check Cargo.lock against the RustSec advisories in ADVISORY_DB (a local clone, never fetched)
	@if [ ! -d "$(ADVISORY_DB)" ]; then \
		echo "audit: no advisory database at $(ADVISORY_DB): nothing checked"; \
		echo "audit: provide one with 'git clone $(ADVISORY_DB_URL) $(ADVISORY_DB)'"; \
		echo "audit: (or run 'make audit ADVISORY_DB=DIR' with DIR a clone of it)"; \
	else \
		command -v cargo-audit >/dev/null 2>&1 || cargo install cargo-audit --locked; \
		echo "audit: advisory database $(ADVISORY_DB) at $$(git -C "$(ADVISORY_DB)" log -1 --format='%h of %cs')"; \
		echo "cargo audit --db $(ADVISORY_DB) --no-fetch --stale"; \
		cargo audit --db "$(ADVISORY_DB)" --no-fetch --stale; \
	fi

clean: ## Remove build outputs and caches (keeps .venv's installed packages)
	rm -rf target $(WHEEL_DIR) .pytest_cache $(BUILD_STAMP)
	rm -f python/egtunnel/*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## Also remove .venv: back to the state of a fresh clone
	rm -rf $(VENV)
