# hsmbridge: `make run` starts the daemon on a dev SoftHSM environment, `make test` runs the suite.
SHELL := /bin/bash
GO ?= go
DEV_DIR ?= .dev
BIN := bin/hsmbridge
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
SOFTHSM_MODULE := $(firstword $(wildcard /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib64/pkcs11/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so))

.PHONY: build run test softhsm vet clean

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/hsmbridge

# softhsm installs SoftHSMv2 when it is missing and we are root, or says why it cannot.
softhsm:
	@if [ -z "$(SOFTHSM_MODULE)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing softhsm2"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null; \
	  else \
	    echo "SoftHSMv2 is missing: install the softhsm2 package (needs root)"; exit 1; \
	  fi; \
	fi

run: softhsm build
	@if [ ! -d $(DEV_DIR) ]; then $(BIN) dev init --dir $(DEV_DIR); fi
	SOFTHSM2_CONF=$(abspath $(DEV_DIR))/softhsm2.conf $(BIN) serve --config $(DEV_DIR)/config.yaml

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }

# The SDK tests are a module of their own (the SDK is too big a dependency for the daemon).
test: softhsm vet
	$(GO) test -race -count=1 ./...
	cd testdata/sdkclient && $(GO) vet ./... && $(GO) test -count=1 ./...

clean:
	rm -rf bin $(DEV_DIR)
