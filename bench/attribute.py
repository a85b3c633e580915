#!/usr/bin/env python3
"""Attributes bench/profile.sh's perf samples to components, per request.

Each sample of `perf record -e cpu-clock -F <frequency>` stands for
1/frequency s of the server's CPU, so a component's samples times
1e6/frequency, divided by the requests served while perf recorded, is its
CPU in µs per request. Components are read off each sample's own frame
(self time), so a function inlined into another counts where it was
inlined: the engine's futures, for one, are polled inside tracing's
`Instrumented` wrapper and show up there.

Profiles of keyed workloads are compared with `bare-new`, `nokey` ones
with `bare-nokey`.

    attribute.py [--frequency HZ] DIR bare:new idem:new idem:replay ...
"""
import argparse
import re
from collections import defaultdict

# First match wins: (component, pattern on "dso symbol").
COMPONENTS = [
    ("kernel (syscalls, wake-ups, scheduling)", r"^\[kernel"),
    ("allocator (malloc, free)", r"malloc|free|unlink_chunk|__rust_(alloc|dealloc|realloc|no_alloc)|__rdl_"),
    ("memcpy, memmove", r"__mem(move|cpy|set|cmp)"),
    ("SHA-256 (fingerprint, scope)", r"sha2::|digest::"),
    ("fingerprint encoding", r"idempotent_core::fingerprint|Serialize for idempotent_bench::handler::NewPayment"),
    ("memory store (tables, hashing)", r"idempotent_core::store|idempotent_core::record|hashbrown|siphasher"),
    ("idempotent-core, other", r"idempotent_core::"),
    ("engine futures (inlined into tracing)", r"tracing::"),
    ("JSON (serde_json, serde)", r"serde_json|serde_path_to_error|serde_core|serde::"),
    ("shared buffers (bytes)", r"bytes::"),
    ("HTTP (hyper, httparse, http)", r"hyper|httparse|http::|http_body|mime::"),
    ("runtime, routing (tokio, axum, tower)", r"tokio|mio::|axum|tower|futures_util|atomic_waker|matchit"),
    ("syscall wrappers, clock (libc, vdso)", r"vdso|writev|_recv|asynccancel|clock_gettime"),
]
LINE = re.compile(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)$")


def component(dso, symbol):
    text = f"{dso} {symbol}"
    for name, pattern in COMPONENTS:
        if re.search(pattern, text):
            return name
    return "other"


def load(directory, name, frequency):
    """µs of CPU per request, by component."""
    with open(f"{directory}/{name}.requests") as f:
        requests = int(f.read().strip() or 0)
    if requests == 0:
        raise SystemExit(f"{name}: wrk reported no requests")
    costs = defaultdict(float)
    with open(f"{directory}/{name}.txt") as f:
        for line in f:
            match = LINE.match(line)
            if match:
                samples, dso, symbol = match.groups()
                costs[component(dso, symbol)] += int(samples)
    scale = 1e6 / frequency / requests
    return {key: samples * scale for key, samples in costs.items()}, requests


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frequency", type=float, default=2999)
    parser.add_argument("directory")
    parser.add_argument("profiles", nargs="+")
    args = parser.parse_args()
    names = [profile.replace(":", "-") for profile in dict.fromkeys(args.profiles)]
    loaded = {name: load(args.directory, name, args.frequency) for name in names}
    # Each profile against its baseline.
    pairs = [
        ("bare-nokey" if name.endswith("-nokey") else "bare-new", name)
        for name in names
        if not name.startswith("bare-")
    ]
    order = [name for name, _ in COMPONENTS] + ["other"]

    def cost(name, key):
        costs = loaded[name][0]
        return sum(costs.values()) if key == "total" else costs.get(key, 0.0)

    header = ["component"]
    for base, name in pairs:
        header += [base, name, "Δ"]
    print("| " + " | ".join(header) + " |")
    print("|---" + "|---:" * (len(header) - 1) + "|")
    for key in order + ["total"]:
        row = [key]
        for base, name in pairs:
            before, after = cost(base, key), cost(name, key)
            row += [f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}"]
        print("| " + " | ".join(row) + " |")
    served = ", ".join(f"{name} {loaded[name][1]:,}" for name in names)
    print(f"\nµs of server CPU per request under perf (self time); requests served: {served}")


if __name__ == "__main__":
    main()
