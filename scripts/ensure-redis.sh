#!/usr/bin/env bash
# Makes sure a Redis answers at $REDIS_ADDR (default 127.0.0.1:6379).
# If none does, it starts a private redis-server on that address, with its
# data in $REDIS_DIR (default .demo/redis), installing Debian's
# redis-server first when it is missing and we are root.
# Prints "started PID" when it started one, "running" otherwise.
set -euo pipefail
addr=${REDIS_ADDR:-127.0.0.1:6379}
host=${addr%:*}
port=${addr##*:}
dir=${REDIS_DIR:-.demo/redis}

answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h "$host" -p "$port" ping 2>/dev/null)" = "PONG" ]
  else
    # No client: speak RESP over bash's /dev/tcp.
    exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    local reply
    read -r -t 2 reply <&3 || true
    exec 3<&- 3>&-
    [ "${reply%$'\r'}" = "+PONG" ]
  fi
}

if answers; then
  echo running
  exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "ensure-redis: no Redis answers at $addr and redis-server is not installed; install it (apt-get install redis-server) or set REDIS_ADDR" >&2
    exit 1
  fi
  echo "ensure-redis: installing redis-server with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq redis-server >&2
fi

mkdir -p "$dir"
# AOF on and noeviction, as production needs (see README); the data stays
# in $dir.
redis-server --bind "$host" --port "$port" --dir "$(cd "$dir" && pwd)" --daemonize yes \
  --pidfile "$(cd "$dir" && pwd)/redis.pid" --logfile "$(cd "$dir" && pwd)/redis.log" \
  --appendonly yes --maxmemory-policy noeviction --save "" >&2
pidfile="$dir/redis.pid"
for _ in $(seq 1 50); do
  if answers; then
    # Another Redis may have come up on the port meanwhile (apt-get starts
    # Debian's service); only claim a server we started and that runs.
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "started $(cat "$pidfile")"
    else
      echo running
    fi
    exit 0
  fi
  sleep 0.1
done
echo "ensure-redis: redis-server did not answer at $addr; see $dir/redis.log" >&2
exit 1
