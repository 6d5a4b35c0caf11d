# hsmbridge: `make run` starts the daemon on a dev SoftHSM environment, `make test` runs the suite.
SHELL := /bin/bash
GO ?= go
DEV_DIR ?= .dev
BIN := bin/hsmbridge
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
SOFTHSM_MODULE := $(firstword $(wildcard /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib64/pkcs11/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so))

.PHONY: build run test softhsm tools vet clean bench deploy-check

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/hsmbridge

# softhsm installs SoftHSMv2 when it is missing and we are root, or says why it cannot.
softhsm:
	@if [ -z "$(SOFTHSM_MODULE)" ]; then $(call apt_install,softhsm2); fi

# tools installs what the deploy checks use: promtool (Debian's prometheus package).
tools:
	@if ! command -v promtool >/dev/null; then $(call apt_install,prometheus); fi

apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(1)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	else \
	  echo "$(1) is missing: install the $(1) package (needs root)"; exit 1; \
	fi

run: softhsm build
	@if [ ! -d $(DEV_DIR) ]; then $(BIN) dev init --dir $(DEV_DIR); fi
	SOFTHSM2_CONF=$(abspath $(DEV_DIR))/softhsm2.conf $(BIN) serve --config $(DEV_DIR)/config.yaml

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }

# The SDK tests are a module of their own (the SDK is too big a dependency for the daemon).
test: softhsm tools vet
	@$(GO) test -count=1 -run '^TestPostgresServer$$' -v ./keystore/store/ | grep -E 'PostgreSQL|FAIL' || true
	$(GO) test -race -count=1 ./...
	cd testdata/sdkclient && $(GO) vet ./... && $(GO) test -count=1 ./...
	$(MAKE) --no-print-directory deploy-check

# bench measures raw PKCS#11 (the ceiling), the hsm package and the daemon over HTTP on a
# throwaway token, and prints one table of ratios. HSMBRIDGE_BENCH_SECONDS sets the seconds per cell.
bench: softhsm
	HSMBRIDGE_BENCH=1 $(GO) test -count=1 -timeout 30m -run '^TestReport$$' -v ./internal/bench/

# deploy-check checks deploy/: promtool rule tests, systemd-analyze, the dashboard JSON and
# testdata/deploytest (needs softhsm for its running-daemon test). See deploy/check.sh.
deploy-check: softhsm tools
	GO=$(GO) bash deploy/check.sh

clean:
	rm -rf bin $(DEV_DIR)
