# One image for every couponflow program: worker, enqueuer, wxsandbox, receiver and
# monitor (every directory under cmd/), each a static binary in
# /usr/local/bin. docker-compose.yml picks the program per service. See
# docs/deploy.md.
#
#   docker build -t couponflow-dispatcher:local .

# Keep in step with the go directive of go.mod: the golang images set
# GOTOOLCHAIN=local, so an older Go refuses to build the module
# (deploy/compose_test.go checks it).
ARG GO_VERSION=1.26.8

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
ARG TARGETOS
ARG TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
# Static binaries (no cgo), without paths of the build machine or debug
# symbols, one per cmd/ directory.
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w" -o /out/ ./cmd/...

# debian:bookworm-slim rather than distroless: the compose file loads the
# sandbox's generated ids with a one-line sh wrapper, and its health checks
# use bash (see docs/deploy.md, "Why a shell in the image").
FROM debian:bookworm-slim
# ca-certificates: the real WeChat Pay API is HTTPS.
# The user is distroless's "nonroot" (65532), so the uid is the same
# whichever base is used. /data and /sandbox belong to it with mode 0700, so
# an empty named volume mounted there starts out owned by it: the sandbox
# writes its keys as that user and the other services read them as it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot \
 && install -d -o 65532 -g 65532 -m 0700 /data /sandbox
COPY --from=build /out/ /usr/local/bin/
# Numeric, so that Kubernetes' runAsNonRoot can check it: nonroot:nonroot.
USER 65532:65532
CMD ["worker"]
