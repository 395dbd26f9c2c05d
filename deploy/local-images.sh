#!/usr/bin/env bash
# deploy/local-images.sh: the base images the compose stack needs, made on
# this machine, for a Docker engine that cannot reach an image registry
# (docs/deploy.md, "Base images without a registry"). It never pulls.
#
#   debian:bookworm-slim      debootstrap --variant=minbase bookworm, imported
#   golang:<GO_VERSION>-bookworm  that, plus this machine's Go toolchain
#                             (/usr/local/go or $(go env GOROOT)), which must
#                             be the Dockerfile's GO_VERSION
#   redis:7                   that, plus Debian's redis-server (and redis-cli)
#   prom/prometheus:v3.5.0    only with LOCAL_PROMETHEUS=1: Prometheus built
#                             from its Go module (see below); slow
#
# An image that already exists under its tag is left alone (FORCE=1 makes
# them again). Needs root (debootstrap), a Docker engine, debootstrap
# (apt-get install debootstrap) and Go. The rootfs is kept in
# $ROOTFS (/var/tmp/couponflow-rootfs) for the next run.
#
# What these are not: the official images. debian:bookworm-slim here is a
# minbase Debian, larger than the slim image (about 200 MB); golang has no
# gcc or git (the build is CGO_ENABLED=0 and takes modules from the proxy);
# redis:7 is Debian's 7.0 with protected mode off, as the official image
# has it. They are good for running the stack here, not for shipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROOTFS=${ROOTFS:-/var/tmp/couponflow-rootfs}
FORCE=${FORCE:-0}
GO=${GO:-go}
if ! command -v "$GO" >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  GO=/usr/local/go/bin/go
fi

say() { printf 'local-images: %s\n' "$*"; }
die() { printf 'local-images: %s\n' "$*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"

have() { [ "$FORCE" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

# A build without BuildKit's frontend image or a registry: these files use
# nothing beyond the classic builder.
build() { # TAG CONTEXT (Dockerfile on stdin)
  local tag=$1 ctx=$2
  DOCKER_BUILDKIT=0 docker build --pull=false -t "$tag" -f - "$ctx" >"$ctx.log" 2>&1 ||
    { tail -30 "$ctx.log" >&2; die "building $tag failed"; }
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# debian:bookworm-slim: a minimal Debian bookworm from Debian's mirror.
if have debian:bookworm-slim; then
  say "debian:bookworm-slim exists"
else
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing: apt-get install -y debootstrap"
  if [ ! -x "$ROOTFS/bin/sh" ]; then
    say "debootstrap --variant=minbase bookworm $ROOTFS (a few minutes)"
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase bookworm "$ROOTFS" >"$tmp/debootstrap.log" 2>&1 ||
      { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  fi
  say "importing $ROOTFS as debian:bookworm-slim"
  tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
fi

# golang:<version>-bookworm: the Dockerfile's build stage. The toolchain is
# this machine's; the image sets what the official one sets (GOPATH, PATH,
# GOTOOLCHAIN=local), takes GOPROXY from `go env GOPROXY` and trusts the CA
# bundle this machine trusts, so `go mod download` in the build works
# wherever `go mod download` works here, proxy or TLS inspection included.
go_version=$(sed -n 's/^ARG GO_VERSION=//p' Dockerfile)
[ -n "$go_version" ] || die "Dockerfile: no ARG GO_VERSION="
golang=golang:$go_version-bookworm
if have "$golang"; then
  say "$golang exists"
else
  goroot=$("$GO" env GOROOT)
  have_version=$("$GO" env GOVERSION)
  [ "$have_version" = "go$go_version" ] ||
    die "$golang needs Go $go_version; this machine's Go ($goroot) is $have_version"
  say "building $golang from $goroot"
  mkdir "$tmp/golang"
  cp -a "$goroot" "$tmp/golang/go"
  cp /etc/ssl/certs/ca-certificates.crt "$tmp/golang/ca-certificates.crt"
  build "$golang" "$tmp/golang" <<EOF
FROM debian:bookworm-slim
COPY go /usr/local/go
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV GOLANG_VERSION=$go_version GOTOOLCHAIN=local GOPATH=/go \
    GOPROXY=$("$GO" env GOPROXY) GOSUMDB=$("$GO" env GOSUMDB) \
    PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /go/src /go/bin && chmod -R 1777 /go
WORKDIR /go
EOF
fi

# redis:7: Debian's redis-server (7.0) and redis-cli. The official image
# builds Redis with protected mode off: without a password or a bind
# address, a stock redis-server refuses every client but loopback, which
# in compose is every client. The wrapper puts that default back; a
# --protected-mode given on the command line still wins (it comes later).
if have redis:7; then
  say "redis:7 exists"
else
  say "building redis:7 from Debian's redis-server"
  mkdir "$tmp/redis"
  cat >"$tmp/redis/redis-server" <<'EOF'
#!/bin/sh
# As the official image: protected mode off unless the arguments say so.
if [ "${1#-}" != "$1" ] || [ $# -eq 0 ]; then
  exec /usr/bin/redis-server --protected-mode no "$@"
fi
conf=$1; shift
exec /usr/bin/redis-server "$conf" --protected-mode no "$@"
EOF
  chmod 0755 "$tmp/redis/redis-server"
  build redis:7 "$tmp/redis" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o redis -g redis -m 0750 /data
COPY redis-server /usr/local/bin/redis-server
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
EOF
fi

# prom/prometheus:v3.5.0: Prometheus v3.5.0 is the Go module
# github.com/prometheus/prometheus v0.305.0. Built without its web UI
# (the UI is made with npm and is not in the module): the HTTP API,
# scraping and /-/healthy work, the pages under /query and /targets do not.
if [ "${LOCAL_PROMETHEUS:-0}" = 1 ]; then
  if have prom/prometheus:v3.5.0; then
    say "prom/prometheus:v3.5.0 exists"
  else
    say "building Prometheus v3.5.0 from its Go module (slow: many minutes on 2 cores)"
    mod=github.com/prometheus/prometheus@v0.305.0
    dir=$("$GO" mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [ -d "$dir" ] || die "go mod download $mod failed"
    mkdir "$tmp/prom"
    cp -a "$dir" "$tmp/prom/src"
    chmod -R u+w "$tmp/prom/src"
    (cd "$tmp/prom/src" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false "$GO" build -trimpath \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=3.5.0" \
      -o "$tmp/prom/prometheus" ./cmd/prometheus)
    rm -rf "$tmp/prom/src"
    build prom/prometheus:v3.5.0 "$tmp/prom" <<'EOF'
FROM debian:bookworm-slim
COPY prometheus /bin/prometheus
RUN install -d -o 65534 -g 65534 /prometheus /etc/prometheus
# By name, as the official image: Docker 20.10 cannot copy a compose
# secret into a container whose USER is numeric: getent unable to find
# entry "65534:65534".
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
  fi
fi

docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' |
  grep -E '^(debian:bookworm-slim|golang:|redis:7|prom/prometheus:)' | sed 's/^/local-images: /'
