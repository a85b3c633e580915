#!/usr/bin/env bash
# Where a request's CPU goes: profiles bench-server with perf while wrk
# drives it, once per profile, and attributes the server's samples to
# components in µs of CPU per request, next to the bare handler's
# (bench/attribute.py; see BENCHMARKS.md, "Where the time goes").
#
#   bench/profile.sh                                   # /idem new and replay
#   PROFILES='idem:new plain:nokey' DURATION=10 bench/profile.sh
#   PIN=1 bench/profile.sh                             # server on CPU 0, wrk on CPU 1
#
# Each profile is ROUTE:WORKLOAD (routes bare, idem, plain; workloads as in
# bench/wrk/workload.lua); the baselines bare:new and bare:nokey are always
# run first. Needs perf (Debian's linux-perf) and wrk. The server is a
# release build with frame pointers and line tables, in its own target
# directory (target/profiling) so the ordinary release build is untouched.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILES=${PROFILES:-idem:new idem:replay}
DURATION=${DURATION:-8}
FREQUENCY=${FREQUENCY:-2999}
STORE=${STORE:-memory}
PORT=${PORT:-24000}
OUT=${OUT:-$(mktemp -d /tmp/idempotent-profile.XXXXXX)}
mkdir -p "$OUT"
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

for tool in perf wrk python3; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done

echo "building bench-server with frame pointers..." >&2
RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --release -q --target-dir target/profiling -p idempotent-bench --bin bench-server
SERVER=$ROOT/target/profiling/release/bench-server

profile_one() { # route workload
  local route=$1 workload=$2 name="$1-$2" pid recorder line
  PORT=$((PORT + 1))
  "${SERVER_CPUS[@]}" "$SERVER" --addr "127.0.0.1:$PORT" --store "$STORE" --max-seconds $((DURATION + 30)) 2>/dev/null &
  pid=$!
  wait_for_port "$PORT"
  perf record -q -e cpu-clock -F "$FREQUENCY" --call-graph fp -p "$pid" -o "$OUT/$name.data" \
    -- sleep "$DURATION" >/dev/null 2>&1 &
  recorder=$!
  line=$(WORKLOAD=$workload timeout $((DURATION + 20)) "${CLIENT_CPUS[@]}" wrk -t2 -c32 -d"${DURATION}s" \
    -s bench/wrk/workload.lua "http://127.0.0.1:$PORT/$route" | grep '^RESULT')
  wait "$recorder" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # Every sample with its DSO and symbol, and the requests served while
  # perf recorded (wrk and perf run for the same DURATION).
  perf report -i "$OUT/$name.data" --no-children --sort dso,symbol -g none --stdio \
    -F overhead,sample,dso,sym 2>/dev/null >"$OUT/$name.txt"
  echo "$line" | sed -n 's/.*requests=\([0-9]*\).*/\1/p' >"$OUT/$name.requests"
  printf '%-14s %s\n' "$name" "${line#RESULT }" >&2
}

BASELINES="bare:new"
case " $PROFILES " in *":nokey "*) BASELINES="$BASELINES bare:nokey" ;; esac
for profile in $BASELINES $PROFILES; do
  profile_one "${profile%%:*}" "${profile#*:}"
done
python3 bench/attribute.py --frequency "$FREQUENCY" "$OUT" $BASELINES $PROFILES
echo "perf data and reports: $OUT" >&2
