#!/usr/bin/env bash
# make demo: a whole campaign, end to end, on this machine.
#
# Makes sure a Redis answers (starting a private one when none does), builds
# the programs, starts the WeChat Pay sandbox with mild faults and one
# worker, queues a campaign of $DEMO_USERS users, watches it finish, then
# prints the status, the report, one user's coupons and the sandbox ledger.
# Everything it started is stopped when it ends, fails or is interrupted.
#
# Environment: REDIS_ADDR (default 127.0.0.1:6379), DEMO_USERS (3000),
# DEMO_TIMEOUT (seconds to wait for the campaign, 300), GO (go).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

GO=${GO:-go}
# Go's tarball install puts it here, and not always on PATH.
if ! command -v "$GO" >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  PATH=$PATH:/usr/local/go/bin
fi
USERS=${DEMO_USERS:-3000}
TIMEOUT=${DEMO_TIMEOUT:-300}
DEMO=.demo
export REDIS_ADDR=${REDIS_ADDR:-127.0.0.1:6379}
redis_host=${REDIS_ADDR%:*}
redis_port=${REDIS_ADDR##*:}

step=0
section() { step=$((step + 1)); printf '\n==> %d. %s\n' "$step" "$*"; }
say() { printf '    %s\n' "$*"; }
die() { printf '\ndemo: FAILED: %s\n' "$*" >&2; exit 1; }

# alive PID: the process exists and is not a zombie left for init to reap.
alive() {
  local stat
  kill -0 "$1" 2>/dev/null || return 1
  [ -d /proc/self ] || return 0 # no procfs: trust kill -0
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1 # gone since
  [[ $stat != *") Z "* ]]
}

# stop NAME PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL.
stop() {
  local name=$1 pid=$2 secs=$3 i
  if alive "$pid"; then
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      say "$name did not stop within ${secs}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    say "$name (pid $pid) had already stopped"
  fi
  wait "$pid" 2>/dev/null || true # reaps our own children; a no-op otherwise
}

# is_demo_redis PID: PID is a redis-server listening on our port (so that a
# stale or empty pid from ensure-redis.sh never makes us kill anything else).
is_demo_redis() {
  [[ $1 =~ ^[0-9]+$ ]] && alive "$1" || return 1
  [ -d /proc/self ] || return 0
  tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -q "redis-server.*:$redis_port"
}

watch_pid='' worker_pid='' sandbox_pid='' redis_pid='' ensuring_redis=''
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  trap '' INT TERM HUP # a second Ctrl-C must not cut the clean-up short
  set +e
  if [ -n "$watch_pid$worker_pid$sandbox_pid$redis_pid$ensuring_redis" ]; then
    printf '\n==> Cleaning up\n'
  fi
  [ -n "$watch_pid" ] && stop "status watch" "$watch_pid" 5
  # The worker first, so that calls in flight finish and are recorded
  # (it gives them up to --call-timeout + 10s), then the sandbox, then Redis.
  [ -n "$worker_pid" ] && stop worker "$worker_pid" 40
  [ -n "$sandbox_pid" ] && stop sandbox "$sandbox_pid" 15
  if [ -n "$ensuring_redis" ] && [ -z "$redis_pid" ] && [ -r "$DEMO/redis/redis.pid" ]; then
    # Interrupted while ensure-redis.sh was starting one.
    redis_pid=$(cat "$DEMO/redis/redis.pid" 2>/dev/null)
  fi
  if [ -n "$redis_pid" ] && is_demo_redis "$redis_pid"; then
    stop "private redis-server" "$redis_pid" 15
  fi
  if [ "$rc" = 0 ]; then
    printf '\ndemo: OK in %ds\n' "$SECONDS"
  else
    printf '\ndemo: exit status %d after %ds (logs in %s)\n' "$rc" "$SECONDS" "$PWD/$DEMO" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'printf "\ndemo: interrupted\n" >&2; exit 130' INT
trap 'printf "\ndemo: terminated\n" >&2; exit 143' TERM
trap 'exit 129' HUP

if ! command -v curl >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "curl is needed; install it (apt-get install curl)"
  echo "demo: installing curl with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl
fi
mkdir -p "$DEMO"

section "Redis at $REDIS_ADDR"
ensuring_redis=1
redis_state=$(REDIS_DIR=$DEMO/redis scripts/ensure-redis.sh)
case $redis_state in
running)
  say "a Redis already answers there; using it (this run's keys are its own)" ;;
started\ *)
  redis_pid=${redis_state#started }
  if is_demo_redis "$redis_pid"; then
    say "none answered: started a private redis-server (pid $redis_pid, data in $DEMO/redis); it stops at the end"
  else
    say "a Redis answers, but ensure-redis.sh reported pid '$redis_pid', which is not a redis-server on port $redis_port; leaving it alone"
    redis_pid=''
  fi ;;
*) die "scripts/ensure-redis.sh said '$redis_state'" ;;
esac
ensuring_redis=''

section "Building the programs (bin/)"
"$GO" build -o bin/ ./cmd/...
say "bin/wxsandbox bin/worker bin/enqueuer bin/monitor"

# A name of its own for every run, so that a shared Redis holding earlier
# runs (or anything else) never mixes with this one.
run_id=demo-$(date +%Y%m%d-%H%M%S)
if bin/enqueuer status | grep -qx -- "$run_id"; then
  run_id=$run_id-$$
fi

section "WeChat Pay sandbox"
port=8090
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
while port_taken "$port"; do
  port=$((port + 1))
  [ "$port" -le 8190 ] || die "no free port between 8090 and 8190"
done
# In a session of its own (when setsid is there) so that a Ctrl-C reaches
# only the worker: the sandbox keeps answering the calls the worker finishes
# while it shuts down, and the trap stops it after the worker.
detach=()
command -v setsid >/dev/null 2>&1 && detach=(setsid)
"${detach[@]}" bin/wxsandbox --addr "127.0.0.1:$port" --data-dir "$DEMO/sandbox" \
  --rate-limit 200 --error-rate 0.05 --commit-fail-rate 0.02 --latency 20ms \
  >"$DEMO/sandbox.log" 2>&1 &
sandbox_pid=$!
base=http://127.0.0.1:$port
for ((i = 0; ; i++)); do
  curl -sf "$base/sandbox/healthz" >/dev/null 2>&1 && break
  if ! alive "$sandbox_pid" || [ "$i" -ge 300 ]; then
    tail -n 20 "$DEMO/sandbox.log" >&2
    die "the sandbox did not come up at $base (log: $DEMO/sandbox.log)"
  fi
  sleep 0.1
done
set -a
# shellcheck disable=SC1091
. "$DEMO/sandbox/sandbox.env"
set +a
[ "$WECHATPAY_BASE_URL" = "$base" ] || die "$DEMO/sandbox/sandbox.env has WECHATPAY_BASE_URL=$WECHATPAY_BASE_URL, not $base"
say "listening at $base (pid $sandbox_pid, log $DEMO/sandbox.log), merchant $WECHATPAY_MCHID"
say "faults: 200 requests/s then 429, 5% 500 SYSTEM_ERROR, 2% issued-then-failed, 20ms latency"
stock_json=$(curl -sf -XPOST "$base/sandbox/stocks" -H 'Content-Type: application/json' -d '{"budget":100000,"max_per_user":1}') ||
  die "creating a stock through $base/sandbox/stocks failed"
stock=$(printf '%s\n' "$stock_json" | sed -n 's/.*"stock_id": *"\([^"]*\)".*/\1/p' | head -n 1)
[ -n "$stock" ] || die "no stock_id in the sandbox's answer: $stock_json"
say "created stock $stock for this run: 1 coupon per user, budget 100000"

section "Worker (logs in $DEMO/worker.log)"
WORKER_HTTP_ADDR=${WORKER_HTTP_ADDR:-127.0.0.1:0} bin/worker --log-format text --queues "$run_id=1" >"$DEMO/worker.log" 2>&1 &
worker_pid=$!
for ((i = 0; ; i++)); do
  grep -q 'worker starting' "$DEMO/worker.log" 2>/dev/null && break
  if ! alive "$worker_pid" || [ "$i" -ge 100 ]; then
    tail -n 20 "$DEMO/worker.log" >&2
    die "the worker did not start (log: $DEMO/worker.log)"
  fi
  sleep 0.1
done
say "pid $worker_pid, queue $run_id, Redis $REDIS_ADDR"

section "Campaign $run_id: $USERS users"
users=$DEMO/users.csv
{
  echo openid
  printf "$run_id-u%05d\n" $(seq 1 "$USERS")
} >"$users"
first_user=$(sed -n 2p "$users")
say "wrote $users ($first_user … $(tail -n 1 "$users"))"
bin/enqueuer campaign --file "$users" --stock-id "$stock" --campaign "$run_id" --queue "$run_id"

section "Progress (every 2s; at most ${TIMEOUT}s)"
timeout "$TIMEOUT" bin/enqueuer status --campaign "$run_id" --watch 2s &
watch_pid=$!
while alive "$watch_pid"; do
  alive "$worker_pid" || die "the worker exited; see $DEMO/worker.log"
  alive "$sandbox_pid" || die "the sandbox exited; see $DEMO/sandbox.log"
  sleep 0.5
done
watch_rc=0
wait "$watch_pid" || watch_rc=$?
watch_pid=''
[ "$watch_rc" != 124 ] || die "the campaign was not done after ${TIMEOUT}s; see $DEMO/worker.log"
[ "$watch_rc" = 0 ] || die "enqueuer status failed (exit status $watch_rc)"

section "Result"
# The look-ups below are single calls that do not retry: faults off first.
curl -sf -XPUT "$base/sandbox/faults" -H 'Content-Type: application/json' \
  -d '{"rate_limit":0,"error_rate":0,"latency":"0s","commit_fail_rate":0,"bad_signature_rate":0}' >/dev/null ||
  die "turning the sandbox's faults off failed"
say "campaign done; sandbox faults now off for the look-ups below"
bin/enqueuer status --campaign "$run_id"
st=$(bin/enqueuer status --campaign "$run_id" --json)
count() { printf '%s\n' "$st" | grep -o "\"$1\":[0-9]*" | head -n 1 | cut -d: -f2; }
succeeded=$(count succeeded) failed=$(count failed) total=$(count total)
bin/enqueuer report --campaign "$run_id" --out "$DEMO/report.csv"
retried=$(awk -F, 'NR > 1 && $3 == "succeeded" && $7 > 1' "$DEMO/report.csv" | wc -l)
say "succeeded $succeeded of $total, $retried of them after more than one attempt (faults at work), failed ${failed:-0}"
say "report:      $PWD/$DEMO/report.csv"
say "worker log:  $PWD/$DEMO/worker.log"
say "sandbox log: $PWD/$DEMO/sandbox.log"

section "Coupons of $first_user, through the WeChat Pay list API"
bin/enqueuer coupons --openid "$first_user"

section "Sandbox ledger ($base/sandbox/ledger)"
ledger=$(curl -sf "$base/sandbox/ledger" | tr -d '\n' | tr -s ' ') || die "reading the ledger failed"
issued=$(printf '%s\n' "$ledger" | grep -o "\"stock_id\": *\"$stock\"" | wc -l)
requests=$(printf '%s\n' "$ledger" | grep -o '"requests": *{[^}]*}' || true)
faults=$(printf '%s\n' "$ledger" | grep -o '"faults": *{[^}]*}' || true)
say "coupons issued on stock $stock: $issued; users in the campaign: $USERS"
say "since the sandbox's data dir was made: ${requests:-no requests} ${faults:-}"

[ "$total" = "$USERS" ] || die "the campaign registered $total sends, not $USERS"
[ "$succeeded" = "$USERS" ] || die "$succeeded of $USERS sends succeeded"
[ "$issued" = "$USERS" ] || die "the sandbox issued $issued coupons on stock $stock, not one for each of the $USERS users"
say "every user got exactly one coupon"

section "Watching it: the monitor"
if [ -n "$redis_pid" ]; then
  say "this run's private Redis stops now, and the campaign with it. To watch a campaign in the browser,"
  say "start a Redis of your own (redis-server --port 6379 --appendonly yes), run make demo again, then:"
else
  say "the campaign stays in the Redis at $REDIS_ADDR. To watch it, and every later one, in the browser:"
fi
say "  REDIS_ADDR=$REDIS_ADDR bin/monitor --addr 127.0.0.1:8080"
say "  then open http://127.0.0.1:8080/campaigns/$run_id (on loopback no credentials are needed;"
say "  asynqmon's view of the queues is under /monitoring/)"
