# Sourced by bench/run.sh and bench/profile.sh: with PIN=1 the server runs
# on CPU 0 alone and wrk on CPU 1, so neither preempts the other; by
# default both share every core. Prefix commands with "${SERVER_CPUS[@]}"
# and "${CLIENT_CPUS[@]}".
PIN=${PIN:-}
SERVER_CPUS=()
CLIENT_CPUS=()
if [ -n "$PIN" ]; then
  command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 1; }
  SERVER_CPUS=(taskset -c 0)
  CLIENT_CPUS=(taskset -c 1)
fi
