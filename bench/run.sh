#!/usr/bin/env bash
# Runs the whole HTTP benchmark suite: see BENCHMARKS.md.
#
#   bench/run.sh                      # everything, 5 rounds of 8 s runs
#   RUNS=3 DURATION=5 bench/run.sh    # shorter
#   ONLY='ours' bench/run.sh          # only configurations whose name matches
#   STORES='memory redis tiered-redis postgres tiered-postgres sqlite' bench/run.sh
#                                     # durable stores need Redis / PostgreSQL on loopback
#   LAYER=router bench/run.sh         # our servers with the idempotency layer
#                                     # around the whole router instead of
#                                     # on each route (the bare baseline
#                                     # keeps its own router)
#   PIN=1 bench/run.sh                # server on CPU 0, wrk on CPU 1: each
#                                     # on a core of its own (taskset)
#   PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 bench/run.sh
#                                     # every server (bare, ours, peers)
#                                     # with that library preloaded
#   VARIANTS='exp=/tmp/bench-server' bench/run.sh
#                                     # also other builds of bench-server,
#                                     # e.g. of an experimental core, on
#                                     # each of STORES
#
# Every run starts a fresh server on 127.0.0.1, drives it with
# wrk -t$THREADS -c$CONNECTIONS -d$DURATION, and stops it. Rounds interleave
# all configurations, so each round's ratios compare runs made minutes
# apart under the same background load. Results: bench/results/<stamp>.tsv
# and a markdown summary next to it (medians over rounds).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-5}
DURATION=${DURATION:-8}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
STORES=${STORES:-memory}
PEERS=${PEERS-idempotent axum-idempotent}
ONLY=${ONLY:-}
VARIANTS=${VARIANTS:-}
WORKLOADS=${WORKLOADS:-new replay mix dup}
# Below the kernel's ephemeral range (32768-60999), so no client socket
# can hold the port a fresh server binds.
PORT=${PORT:-21000}
LAYER=${LAYER:-}
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"
OUT=${OUT:-$ROOT/bench/results}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
TSV=$OUT/$STAMP.tsv
LUA=$ROOT/bench/wrk/workload.lua

command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }
mkdir -p "$OUT"

echo "building servers (release)..." >&2
cargo build --release -j2 -q -p idempotent-bench --bin bench-server
SERVER=$ROOT/target/release/bench-server
PEER_SERVER=""
if [ -n "$PEERS" ]; then
  # `idempotent` 2.0.0 declares rust-version 1.98 but builds on older
  # toolchains; see BENCHMARKS.md.
  (cd bench/peers && cargo build --release -j2 -q --ignore-rust-version)
  PEER_SERVER=$ROOT/bench/peers/target/release/peer-server
fi

# name | server kind (ours, peer or a bench-server path) | server argument | path | workload
CONFIGS=()
CONFIGS+=("bare|ours|memory|/bare|new")
CONFIGS+=("bare-nokey|ours|memory|/bare|nokey")
CONFIGS+=("ours-plain-nokey|ours|memory|/plain|nokey")
for store in $STORES; do
  for workload in $WORKLOADS; do
    CONFIGS+=("ours-$store-$workload|ours|$store|/idem|$workload")
  done
done
for variant in $VARIANTS; do
  for store in $STORES; do
    for workload in $WORKLOADS; do
      # Variants on the memory store keep their short names.
      label=${variant%%=*}-$store; [ "$store" = memory ] && label=${variant%%=*}
      CONFIGS+=("ours-$label-$workload|${variant#*=}|$store|/idem|$workload")
    done
  done
  CONFIGS+=("ours-${variant%%=*}-plain-nokey|${variant#*=}|memory|/plain|nokey")
done
for peer in $PEERS; do
  for workload in $WORKLOADS; do
    CONFIGS+=("$peer-$workload|peer|$peer|/idem|$workload")
  done
  CONFIGS+=("$peer-plain-nokey|peer|$peer|/plain|nokey")
done

# Durable stores start every run empty (their own Redis database, table and
# file: see bench-server.rs).
reset_store() {
  case "$1" in
    *redis) redis-cli -h 127.0.0.1 -n 15 flushdb >/dev/null ;;
    *postgres) psql -q -h 127.0.0.1 -U postgres -d test \
      -c 'DROP TABLE IF EXISTS idempotent_bench' >/dev/null 2>&1 || true ;;
    sqlite) rm -f /tmp/idempotent-bench.sqlite /tmp/idempotent-bench.sqlite-wal /tmp/idempotent-bench.sqlite-shm ;;
  esac
}

run_one() { # round name kind arg path workload
  local round=$1 name=$2 kind=$3 arg=$4 path=$5 workload=$6
  PORT=$((PORT + 1))
  local addr=127.0.0.1:$PORT limit=$((DURATION + 30)) pid cookie="" line
  [ "$kind" = peer ] || reset_store "$arg"
  local layer=()
  if [ -n "$LAYER" ] && [ "$path" != /bare ]; then layer=(--layer "$LAYER"); fi
  if [ "$kind" = ours ]; then
    "${SERVER_CPUS[@]}" "$SERVER" --addr "$addr" --store "$arg" "${layer[@]}" --max-seconds "$limit" 2>/dev/null &
  elif [ "$kind" != peer ]; then
    "${SERVER_CPUS[@]}" "$kind" --addr "$addr" --store "$arg" "${layer[@]}" --max-seconds "$limit" 2>/dev/null &
  else
    "${SERVER_CPUS[@]}" "$PEER_SERVER" --peer "$arg" --addr "$addr" --max-seconds "$limit" 2>/dev/null &
  fi
  pid=$!
  if ! wait_for_port "$PORT"; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    printf 'round %s  %-28s server did not start; run skipped\n' "$round" "$name" >&2
    return 0
  fi
  if [ "$arg" = axum-idempotent ]; then
    # The layer only caches for requests that already carry a session.
    cookie=$(curl -s -o /dev/null -D - "http://$addr/login" | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\).*/\1/p' | head -1)
  fi
  line=$(COOKIE=$cookie WORKLOAD=$workload timeout $((DURATION + 20)) \
    "${CLIENT_CPUS[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$LUA" "http://$addr$path" | grep '^RESULT' || true)
  # The server's own CPU time (user + system) over the whole run: steadier
  # than req/s when other work shares the machine.
  local ticks
  ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$line" ]; then line="$line cpu_s=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}')"; fi
  if [ -z "$line" ]; then line="RESULT requests=0 seconds=0 rps=0 p50_us=0 p99_us=0 non2xx=0 socket_errors=0 cpu_s=0"; fi
  printf '%s\t%s\t%s\n' "$round" "$name" "$(echo "$line" | sed 's/^RESULT //; s/ /\t/g')" >>"$TSV"
  printf 'round %s  %-28s %s\n' "$round" "$name" "${line#RESULT }" >&2
}

{
  echo "# $(date -u) $(uname -r) $(nproc) cores; wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s${PIN:+; server on CPU 0, wrk on CPU 1}${LAYER:+; layer on $LAYER}${PRELOAD:+; servers with $PRELOAD preloaded}; load: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$TSV"
for round in $(seq 1 "$RUNS"); do
  for config in "${CONFIGS[@]}"; do
    IFS='|' read -r name kind arg path workload <<<"$config"
    if [ -n "$ONLY" ] && [[ ! "$name" =~ $ONLY ]] && [[ ! "$name" =~ ^bare ]]; then continue; fi
    run_one "$round" "$name" "$kind" "$arg" "$path" "$workload"
  done
done
echo "# end $(date -u); load: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$TSV"
python3 "$ROOT/bench/summarize.py" "$TSV" | tee "${TSV%.tsv}.md"
