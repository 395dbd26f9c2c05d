#!/usr/bin/env bash
# make compose-smoke: the compose stack, end to end, on this machine's
# Docker engine; where none answers it says it skipped and exits 0.
#
# In a compose project of its own ($SMOKE_PROJECT, default
# couponflow-smoke, with its own volumes; your .env is not read) it
#   1. builds the image (once: only the worker service builds it),
#   2. starts Redis, the sandbox, $SMOKE_WORKERS workers (2) and the monitor
#      (and Prometheus, see SMOKE_MONITORING) and waits until all are
#      healthy,
#   3. runs a campaign of $SMOKE_USERS users (300) on the sandbox's stock
#      with `docker compose run --rm enqueuer`, which must not recreate any
#      running service, and checks that every user got exactly one coupon:
#      enqueuer status and report (exit status and counts), the sandbox's
#      ledger and stock (its admin API),
#   4. checks that the monitor answers 401 without credentials and 200 with
#      them, and that a second `docker compose up -d` keeps every container,
#   5. stops the workers in the middle of a second campaign of
#      $SMOKE_STOP_USERS users (200; the sandbox answers in 1s meanwhile, so
#      that calls are in flight), checks that they stopped cleanly with
#      nothing left in flight, starts them again and checks that this
#      campaign too ends with exactly one coupon each,
#   6. stops everything (docker compose stop: a graceful stop, exit status 0
#      for every program) and removes it with its volumes (down -v).
# It leaves nothing behind, also when it fails or is interrupted
# (SMOKE_KEEP=1 keeps the stack for a look; then remove it with
# `docker compose -p couponflow-smoke down -v`).
#
# It publishes the ports of docker-compose.yml (127.0.0.1:8080, 8090 and,
# with Prometheus, 9090): stop another stack that holds them first.
#
# Environment: SMOKE_USERS (300), SMOKE_STOP_USERS (200), SMOKE_WORKERS (2),
# SMOKE_TIMEOUT (seconds a campaign may take, 300), SMOKE_PROJECT,
# SMOKE_MONITORING (1: with Prometheus, whose targets must all be up;
# 0: without; default: with it when the image prom/prometheus:v3.5.0 is
# on this machine, since this never pulls it), SMOKE_KEEP.
# Not part of `make test`: CI has no Docker engine. Base images without a
# registry: deploy/local-images.sh (docs/deploy.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

USERS=${SMOKE_USERS:-300}
STOP_USERS=${SMOKE_STOP_USERS:-200}
WORKERS=${SMOKE_WORKERS:-2}
TIMEOUT=${SMOKE_TIMEOUT:-300}
PROJECT=${SMOKE_PROJECT:-couponflow-smoke}
PROM_IMAGE=prom/prometheus:v3.5.0

skip() { printf 'compose-smoke: SKIPPED: %s\n' "$*"; exit 0; }
command -v docker >/dev/null 2>&1 || skip "no docker command on PATH"
docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed)"
docker compose version >/dev/null 2>&1 || skip "a Docker engine answers, but docker compose (v2) is missing"

step=0
section() { step=$((step + 1)); printf '\n==> %d. %s\n' "$step" "$*"; }
say() { printf '    %s\n' "$*"; }
die() { printf '\ncompose-smoke: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v curl >/dev/null 2>&1 || die "curl is needed (apt-get install curl)"

MONITORING=${SMOKE_MONITORING:-}
if [ -z "$MONITORING" ]; then
  MONITORING=0
  docker image inspect "$PROM_IMAGE" >/dev/null 2>&1 && MONITORING=1
fi

tmp=$(mktemp -d)
run=smoke-$(date +%Y%m%d-%H%M%S)
stop_run=$run-stop
password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
# The project's variables, here and for compose, whatever the shell or a
# .env says: the file keeps .env out, the exports win over the shell's.
export MONITOR_USER=admin MONITOR_PASSWORD=$password WORKERS
export COMPOSE_PROFILES=
[ "$MONITORING" = 1 ] && COMPOSE_PROFILES=monitoring
printf 'MONITOR_USER=%s\nMONITOR_PASSWORD=%s\nWORKERS=%s\nCOMPOSE_PROFILES=%s\n' \
  "$MONITOR_USER" "$MONITOR_PASSWORD" "$WORKERS" "$COMPOSE_PROFILES" >"$tmp/env"
dc() { docker compose -p "$PROJECT" --env-file "$tmp/env" "$@"; }
enqueuer() { dc run --rm -T enqueuer "$@" 2>"$tmp/run.err"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  trap '' INT TERM HUP
  set +e
  rm -f "campaigns/$run.csv" "campaigns/$stop_run.csv"
  rmdir campaigns 2>/dev/null
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    printf '\ncompose-smoke: SMOKE_KEEP=1: the stack is still up; remove it with docker compose -p %s down -v\n' "$PROJECT"
  elif [ -n "${started:-}" ]; then
    if [ "$rc" != 0 ]; then
      logs=${TMPDIR:-/tmp}/compose-smoke-$run.log
      dc logs --no-color --tail 50 >"$logs" 2>&1
      printf '\ncompose-smoke: the last log lines of every service are in %s\n' "$logs" >&2
    fi
    printf '\n==> Removing the stack (down -v)\n'
    dc down -v --remove-orphans >"$tmp/down.log" 2>&1 || cat "$tmp/down.log" >&2
  fi
  rm -rf "$tmp"
  if [ "$rc" = 0 ]; then
    printf '\ncompose-smoke: OK in %ds\n' "$SECONDS"
  else
    printf '\ncompose-smoke: exit status %d after %ds\n' "$rc" "$SECONDS" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'printf "\ncompose-smoke: interrupted\n" >&2; exit 130' INT
trap 'printf "\ncompose-smoke: terminated\n" >&2; exit 143' TERM
trap 'exit 129' HUP

section "Docker"
say "engine $(docker version --format '{{.Server.Version}}'), $(docker compose version | head -n 1), project $PROJECT"
say "$WORKERS workers; Prometheus: $([ "$MONITORING" = 1 ] && echo "yes ($PROM_IMAGE)" || echo "no (SMOKE_MONITORING=1 for it; $PROM_IMAGE is not on this machine)")"
started=1
dc down -v --remove-orphans >/dev/null 2>&1 || true # what an interrupted run left
ports=(8080 8090)
[ "$MONITORING" = 1 ] && ports+=(9090)
for p in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    die "127.0.0.1:$p is taken (another couponflow stack?); the stack publishes it"
  fi
done

section "Build (docker compose build)"
t=$(now)
dc build >"$tmp/build.log" 2>&1 || { tail -n 40 "$tmp/build.log" >&2; die "docker compose build failed"; }
built=$(grep -cE '^ *[a-z-]+ +Built$' "$tmp/build.log" || true)
image_id=$(docker image inspect -f '{{.Id}}' couponflow-dispatcher:local)
say "couponflow-dispatcher:local ${image_id:7:12} in $(since "$t")s; services that built: $built"
[ "$built" -le 1 ] || die "$built services built an image; only the worker should (see deploy/compose_test.go)"

section "Up: docker compose up -d --wait"
t=$(now)
dc up -d --wait --wait-timeout 240 >"$tmp/up.log" 2>&1 || {
  cat "$tmp/up.log" >&2
  dc ps -a >&2
  die "the stack did not become healthy within 240s"
}
healthy_after=$(since "$t")
n=$(dc ps -q worker | wc -l)
[ "$n" = "$WORKERS" ] || die "$n workers run, not $WORKERS"
for c in $(dc ps -q sandbox worker monitor); do
  [ "$(docker inspect -f '{{.Image}}' "$c")" = "$image_id" ] ||
    die "container $(docker inspect -f '{{.Name}}' "$c") does not run couponflow-dispatcher:local as built"
done
say "every service healthy after ${healthy_after}s ($WORKERS workers), all on image ${image_id:7:12}"
dc ps --format '{{.Name}}\t{{.Status}}' | sed 's/^/    /'

sandbox=http://127.0.0.1:8090
monitor=http://127.0.0.1:8080
stock=$(curl -sf "$sandbox/sandbox/env" | sed -n 's/^SANDBOX_STOCK_ID=//p')
[ -n "$stock" ] || die "no SANDBOX_STOCK_ID from $sandbox/sandbox/env"
issued() { curl -sf "$sandbox/sandbox/stocks/$stock" | tr -d ' \n' | grep -o '"issued":[0-9]*' | cut -d: -f2; }
containers() { dc ps -q | sort; }

# write_users NAME COUNT: campaigns/NAME.csv, readable by the containers'
# user (65532).
write_users() {
  mkdir -p campaigns
  chmod 755 campaigns
  { echo openid; printf "$1-u%05d\n" $(seq 1 "$2"); } >"campaigns/$1.csv"
  chmod 644 "campaigns/$1.csv"
}

# wait_done NAME: enqueuer status --watch until the campaign is done.
wait_done() {
  timeout "$TIMEOUT" docker compose -p "$PROJECT" --env-file "$tmp/env" run --rm -T enqueuer \
    status --campaign "$1" --watch 2s >"$tmp/watch.log" 2>&1 || {
    tail -n 15 "$tmp/watch.log" >&2
    die "campaign $1 was not done within ${TIMEOUT}s (or enqueuer status failed)"
  }
}

# check_campaign NAME COUNT ISSUED_BEFORE: every one of COUNT users got
# exactly one coupon, by the enqueuer and by the sandbox.
check_campaign() {
  local name=$1 count=$2 before=$3 st total succeeded report rows ok openids coupons ledger got dups delta
  st=$(enqueuer status --campaign "$name" --json) || die "enqueuer status --campaign $name: exit status $? ($(cat "$tmp/run.err"))"
  total=$(printf '%s' "$st" | grep -o '"total":[0-9]*' | cut -d: -f2)
  succeeded=$(printf '%s' "$st" | grep -o '"succeeded":[0-9]*' | cut -d: -f2)
  [ "$total" = "$count" ] && [ "$succeeded" = "$count" ] ||
    die "campaign $name: $succeeded of $total succeeded, want $count of $count: $st"
  report=$tmp/$name.csv
  enqueuer report --campaign "$name" --out - >"$report" || die "enqueuer report --campaign $name: exit status $?"
  rows=$(($(wc -l <"$report") - 1))
  ok=$(awk -F, 'NR > 1 && $3 == "succeeded" && $4 != ""' "$report" | wc -l)
  openids=$(awk -F, 'NR > 1 { print $2 }' "$report" | sort -u | wc -l)
  coupons=$(awk -F, 'NR > 1 && $4 != "" { print $4 }' "$report" | sort -u | wc -l)
  [ "$rows" = "$count" ] && [ "$ok" = "$count" ] && [ "$openids" = "$count" ] && [ "$coupons" = "$count" ] ||
    die "report of $name: $rows rows, $ok succeeded with a coupon id, $openids users, $coupons distinct coupons; want $count each"
  ledger=$(curl -sf "$sandbox/sandbox/ledger" | tr -d '\n' | grep -o "\"openid\": *\"$name-u[0-9]*\"" | grep -o "$name-u[0-9]*") ||
    die "the sandbox's ledger has no coupon for campaign $name"
  got=$(printf '%s\n' "$ledger" | sort -u | wc -l)
  dups=$(printf '%s\n' "$ledger" | sort | uniq -d | wc -l)
  delta=$(($(issued) - before))
  [ "$got" = "$count" ] && [ "$dups" = 0 ] && [ "$delta" = "$count" ] ||
    die "sandbox, campaign $name: $got users hold a coupon, $dups hold more than one, the stock issued $delta; want $count, 0, $count"
  say "$name: enqueuer: $succeeded of $total succeeded; report: $rows rows, $coupons distinct coupons for $openids users"
  say "$name: sandbox: $got users hold a coupon, $dups hold more than one, stock $stock issued $delta"
}

section "Campaign $run: $USERS users on stock $stock"
write_users "$run" "$USERS"
before=$(issued)
ids=$(containers)
t=$(now)
enqueuer campaign --file "/campaigns/$run.csv" --stock-id "$stock" --campaign "$run" >"$tmp/campaign.log" ||
  { cat "$tmp/campaign.log" "$tmp/run.err" >&2; die "enqueuer campaign: exit status $?"; }
sed 's/^/    /' "$tmp/campaign.log"
[ "$(containers)" = "$ids" ] || die "docker compose run --rm enqueuer recreated a running service"
say "docker compose run --rm enqueuer left every running container as it was"
wait_done "$run"
campaign_secs=$(since "$t")
say "done ${campaign_secs}s after the enqueuer started (container start-ups included)"
check_campaign "$run" "$USERS" "$before"

section "The monitor"
code=$(curl -s -o /dev/null -w '%{http_code}' "$monitor/")
[ "$code" = 401 ] || die "the monitor answered $code without credentials, want 401"
code=$(curl -s -o /dev/null -w '%{http_code}' -u "admin:wrong-$password" "$monitor/")
[ "$code" = 401 ] || die "the monitor answered $code to a wrong password, want 401"
code=$(curl -s -o "$tmp/page.html" -w '%{http_code}' -u "admin:$password" "$monitor/")
[ "$code" = 200 ] || die "the monitor answered $code with its credentials, want 200"
grep -q "$run" "$tmp/page.html" || die "the monitor's page does not show campaign $run"
code=$(curl -s -o "$tmp/api.json" -w '%{http_code}' -u "admin:$password" "$monitor/api/campaigns/$run")
[ "$code" = 200 ] || die "GET /api/campaigns/$run answered $code, want 200"
code=$(curl -s -o /dev/null -w '%{http_code}' "$monitor/readyz")
[ "$code" = 200 ] || die "the monitor's /readyz answered $code, want 200"
say "/ without credentials: 401, with a wrong password: 401, with them: 200 (shows $run); /api/campaigns/$run: 200; /readyz: 200"

if [ "$MONITORING" = 1 ]; then
  section "Prometheus: every worker and the monitor scraped"
  # up JOB: how many of JOB's targets are up (one target a line).
  up() { printf '%s\n' "$targets" | grep -F "\"scrapePool\":\"$1\"" | grep -cF '"health":"up"' || true; }
  for ((i = 0; ; i++)); do
    targets=$(curl -sf http://127.0.0.1:9090/api/v1/targets | tr -d ' \n' | sed 's/{"discoveredLabels"/\n&/g' || true)
    [ "$(up worker)" = "$WORKERS" ] && [ "$(up monitor)" = 1 ] && break
    [ "$i" -lt 60 ] || die "Prometheus after 60s: $(up worker) of $WORKERS workers and $(up monitor) monitor up: $targets"
    sleep 1
  done
  say "targets up: $(up worker) workers, $(up monitor) monitor, after ${i}s"
fi

section "docker compose up -d again: the scale and every container stay"
ids=$(containers)
dc up -d --wait --wait-timeout 120 >"$tmp/up2.log" 2>&1 || { cat "$tmp/up2.log" >&2; die "the second up failed"; }
[ "$(containers)" = "$ids" ] || die "a second docker compose up -d changed the containers: $(dc ps --format '{{.Name}}' | tr '\n' ' ')"
say "$(dc ps -q worker | wc -l) workers, no container recreated"

section "Graceful stop of the workers in the middle of campaign $stop_run ($STOP_USERS users)"
curl -sf -XPUT "$sandbox/sandbox/faults" -H 'Content-Type: application/json' -d '{"latency":"1s"}' >/dev/null ||
  die "setting the sandbox's latency failed"
say "the sandbox now answers after 1s, so that calls are in flight when the workers stop"
write_users "$stop_run" "$STOP_USERS"
before_stop=$(issued)
enqueuer campaign --file "/campaigns/$stop_run.csv" --stock-id "$stock" --campaign "$stop_run" >"$tmp/campaign2.log" ||
  { cat "$tmp/campaign2.log" "$tmp/run.err" >&2; die "enqueuer campaign: exit status $?"; }
for ((i = 0; i < 600; i++)); do
  [ $(($(issued) - before_stop)) -ge 20 ] && break
  sleep 0.1
done
t=$(now)
dc stop worker >"$tmp/stop.log" 2>&1 || { cat "$tmp/stop.log" >&2; die "docker compose stop worker failed"; }
stop_secs=$(since "$t")
for c in $(dc ps -a -q worker); do
  code=$(docker inspect -f '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || die "worker $(docker inspect -f '{{.Name}}' "$c") exited with status $code, want 0 (a graceful stop)"
done
st=$(enqueuer status --campaign "$stop_run" --json) || die "enqueuer status: exit status $?"
mid_ok=$(printf '%s' "$st" | grep -o '"succeeded":[0-9]*' | cut -d: -f2)
inflight=$(printf '%s' "$st" | grep -o '"in_flight":[0-9]*' | cut -d: -f2)
unknown=$(printf '%s' "$st" | grep -o '"unknown":[0-9]*' | cut -d: -f2)
mid_issued=$(($(issued) - before_stop))
say "the $WORKERS workers stopped in ${stop_secs}s, exit status 0; $mid_ok of $STOP_USERS succeeded, $inflight in flight, $unknown unknown; the sandbox issued $mid_issued"
[ "$inflight" = 0 ] && [ "$unknown" = 0 ] || die "after a graceful stop $inflight sends are in flight and $unknown unknown, want 0"
[ "$mid_ok" = "$mid_issued" ] || die "the sandbox issued $mid_issued coupons, the enqueuer counts $mid_ok succeeded: a call in flight was not recorded"
[ "$mid_ok" -lt "$STOP_USERS" ] || say "(the campaign had finished before the stop: raise SMOKE_STOP_USERS for a stop in the middle)"
curl -sf -XPUT "$sandbox/sandbox/faults" -H 'Content-Type: application/json' -d '{"latency":"0s"}' >/dev/null ||
  die "resetting the sandbox's latency failed"
dc up -d --wait --wait-timeout 120 >"$tmp/up3.log" 2>&1 || { cat "$tmp/up3.log" >&2; die "starting the workers again failed"; }
say "workers started again ($(dc ps -q worker | wc -l)); the rest of the campaign:"
wait_done "$stop_run"
check_campaign "$stop_run" "$STOP_USERS" "$before_stop"

section "Stop everything (docker compose stop), then down -v"
t=$(now)
dc stop >"$tmp/stop-all.log" 2>&1 || { cat "$tmp/stop-all.log" >&2; die "docker compose stop failed"; }
say "stopped in $(since "$t")s"
for c in $(dc ps -a -q sandbox worker monitor); do
  code=$(docker inspect -f '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || die "$(docker inspect -f '{{.Name}}' "$c") exited with status $code, want 0"
done
say "sandbox, workers and monitor exited with status 0"
dc down -v --remove-orphans >"$tmp/down.log" 2>&1 || { cat "$tmp/down.log" >&2; die "docker compose down -v failed"; }
started=''
left=$(docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
[ "$left" = 0 ] && [ "$vols" = 0 ] || die "after down -v: $left containers and $vols volumes of $PROJECT are left"
say "no container, network or volume of $PROJECT left"

printf '\ncompose-smoke: %s users and %s users (stopped midway), each with exactly one coupon; healthy after %ss\n' \
  "$USERS" "$STOP_USERS" "$healthy_after"
