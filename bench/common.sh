# Sourced by bench/run.sh, bench/profile.sh and bench/pgbench/compare.sh.

# With PIN=1 the server runs on CPU 0 alone and wrk on CPU 1, so neither
# preempts the other; by default both share every core. Prefix commands
# with "${SERVER_CPUS[@]}" and "${CLIENT_CPUS[@]}".
PIN=${PIN:-}
SERVER_CPUS=()
CLIENT_CPUS=()
if [ -n "$PIN" ]; then
  command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 1; }
  SERVER_CPUS=(taskset -c 0)
  CLIENT_CPUS=(taskset -c 1)
fi

# With PRELOAD=/path/to/lib.so every server (the bare baseline, ours and
# the peers alike) runs with that library preloaded, e.g. another malloc:
# PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (Debian's libjemalloc2).
# wrk is left as it is.
PRELOAD=${PRELOAD:-}
if [ -n "$PRELOAD" ]; then
  [ -r "$PRELOAD" ] || { echo "PRELOAD: $PRELOAD not found" >&2; exit 1; }
  SERVER_CPUS=(env "LD_PRELOAD=$PRELOAD" "${SERVER_CPUS[@]}")
fi

# Waits up to 5 s for a server to accept connections on 127.0.0.1:$1.
wait_for_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "server on port $1 did not start" >&2
  return 1
}
