#!/usr/bin/env bash
# PostgresStore over HTTP against pgbench on the same SQL, alternating:
# each round runs pgbench, then every build of bench-server on all-new
# keys, then pgbench again (see BENCHMARKS.md).
#
#   bench/pgbench/compare.sh                                # this checkout's build
#   BUILDS='before=/path/a after=/path/b' ROUNDS=5 bench/pgbench/compare.sh
#   KEPT='32 15' bench/pgbench/compare.sh                   # each build keeping 32, then 15
#
# KEPT is how many connections the store keeps for its statements
# (bench-server --pg-connections, in a pool of one more); by default as
# many as pgbench has clients, so both drive PostgreSQL at the same
# concurrency. `PostgresStore::connect` keeps 15.
#
# Needs PostgreSQL on 127.0.0.1:5432 (database test, user postgres) and wrk.
set -euo pipefail

cd "$(dirname "$0")/../.."
# shellcheck source=bench/common.sh
. bench/common.sh
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-32}
PORT=${PORT:-23000}
KEPT=${KEPT:-$CLIENTS}
read -r first_kept _ <<<"$KEPT"
if [ -z "${BUILDS:-}" ]; then
  cargo build --release -q -p idempotent-bench --bin bench-server
  BUILDS="main=$PWD/target/release/bench-server"
fi

pgbench_tps() {
  pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$CLIENTS" -j 2 -T "$DURATION" \
    -f bench/pgbench/claim_complete.sql test 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}

# req/s and server CPU µs per request of one build, keeping $3
# connections, on a fresh table.
store_run() {
  local bin=$1 port=$2 kept=$3 pid line ticks requests
  psql -q -h 127.0.0.1 -U postgres -d test -c 'DROP TABLE IF EXISTS idempotent_bench' >/dev/null 2>&1
  "$bin" --addr "127.0.0.1:$port" --store postgres --pg-connections "$kept" \
    --max-seconds $((DURATION + 30)) 2>/dev/null &
  pid=$!
  wait_for_port "$port" || true
  line=$(WORKLOAD=new wrk -t2 -c"$CLIENTS" -d"${DURATION}s" -s bench/wrk/workload.lua \
    "http://127.0.0.1:$port/idem" | grep '^RESULT')
  ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  requests=$(echo "$line" | sed -n 's/.*requests=\([0-9]*\).*/\1/p')
  echo "$(echo "$line" | sed -n 's/.*rps=\([0-9.]*\).*/\1/p') $(awk -v t="$ticks" -v n="$requests" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.0f", t / hz / n * 1e6}')"
}

# The table pgbench writes to exists once a bench-server has migrated it.
first_build=${BUILDS%% *}
store_run "${first_build#*=}" "$PORT" "$first_kept" >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  before=$(pgbench_tps)
  results=()
  for build in $BUILDS; do
    for kept in $KEPT; do
      PORT=$((PORT + 1))
      read -r rps cpu < <(store_run "${build#*=}" "$PORT" "$kept")
      results+=("${build%%=*}/$kept $rps $cpu")
    done
  done
  after=$(pgbench_tps)
  line="round $round  pgbench $before / $after tps"
  for result in "${results[@]}"; do
    read -r name rps cpu <<<"$result"
    ratio=$(awk -v a="$before" -v b="$after" -v r="$rps" 'BEGIN {printf "%.2f", r / ((a + b) / 2)}')
    line="$line  |  $name $rps req/s, $cpu µs/req, ${ratio}x pgbench"
  done
  echo "$line"
done
