GO ?= go
BIN := bin

.PHONY: build install test vet fmt bench demo sandbox clean compose-smoke local-images

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# The programs on the PATH: into $(go env GOPATH)/bin, or GOBIN.
install:
	$(GO) install ./cmd/...

# The README's test command: what CI runs. -count=1: the e2e tests run
# programs they build with go build, which go test's cache cannot see, so
# a cached pass could hide a broken command.
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

bench:
	$(GO) test -run '^$$' -bench . -benchmem $$($(GO) list ./... | grep -v '/bench$$')
	$(GO) test -run '^$$' -bench . -benchtime=1x -timeout 30m ./bench

# A sandbox on its own, with keys and sandbox.env in .demo/sandbox.
sandbox:
	$(GO) run ./cmd/wxsandbox --addr 127.0.0.1:8090 --data-dir .demo/sandbox

clean:
	rm -rf $(BIN) .demo

# The README's first command: a whole campaign against the sandbox, with a
# private Redis when none answers at REDIS_ADDR. Leaves nothing running.
demo:
	GO="$(GO)" bash scripts/demo.sh

# The compose stack end to end on this machine's Docker engine: build, up
# with 2 workers, two campaigns (one through a graceful stop of the
# workers), one coupon each, the monitor behind auth, down -v. Says it
# skipped, and exits 0, where no engine answers. Not part of `make test`:
# CI has no Docker engine. See docs/deploy.md.
compose-smoke:
	bash deploy/compose-smoke.sh

# The base images (debian, golang, redis; LOCAL_PROMETHEUS=1 for
# Prometheus) made on this machine, for an engine that reaches no registry.
local-images:
	GO="$(GO)" bash deploy/local-images.sh
