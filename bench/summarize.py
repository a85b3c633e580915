#!/usr/bin/env python3
"""Summarizes a bench/run.sh results file: medians over rounds.

Each configuration's ratio is taken per round against that round's bare run
(the `nokey` routes against `bare-nokey`, the rest against `bare`), and the
median of those per-round ratios is reported with its range.
"""
import sys
from collections import defaultdict
from statistics import median


def load(path):
    rows = defaultdict(dict)  # name -> round -> fields
    order = []
    header = []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                header.append(line.strip("# \n"))
                continue
            parts = line.rstrip("\n").split("\t")
            round_, name = parts[0], parts[1]
            fields = dict(p.split("=", 1) for p in parts[2:])
            rows[name][round_] = {k: float(v) for k, v in fields.items()}
            if name not in order:
                order.append(name)
    return header, order, rows


def baseline(name):
    return "bare-nokey" if name.endswith("nokey") else "bare"


def ratio_stats(rows, name, other):
    ratios = [
        r["rps"] / rows[other][round_]["rps"]
        for round_, r in rows[name].items()
        if round_ in rows.get(other, {}) and rows[other][round_]["rps"] > 0
    ]
    if not ratios:
        return None
    return median(ratios), min(ratios), max(ratios)


def cpu_us(run):
    """Server CPU time per request, in microseconds."""
    return 1e6 * run.get("cpu_s", 0) / run["requests"] if run["requests"] else 0


def cpu_ratio_stats(rows, name, other):
    """Per round, bare's CPU per request over this one's: the throughput ratio
    a CPU-bound server would reach alone on the machine."""
    ratios = [
        cpu_us(rows[other][round_]) / cpu_us(r)
        for round_, r in rows[name].items()
        if round_ in rows.get(other, {}) and cpu_us(r) > 0
    ]
    if not ratios:
        return None
    return median(ratios), min(ratios), max(ratios)


def fmt_ratio(stats):
    if stats is None:
        return "-"
    mid, low, high = stats
    return f"{mid:.2f}x ({low:.2f}-{high:.2f})"


def main(path):
    header, order, rows = load(path)
    for line in header:
        print(f"<!-- {line} -->")
    print(
        "| configuration | req/s | p50 ms | p99 ms | req/s vs bare (range) "
        "| server CPU µs/req | CPU vs bare (range) | non-2xx/run | runs |"
    )
    print("|---|---:|---:|---:|---|---:|---|---:|---:|")
    for name in order:
        runs = list(rows[name].values())
        rps = median(r["rps"] for r in runs)
        p50 = median(r["p50_us"] for r in runs) / 1000
        p99 = median(r["p99_us"] for r in runs) / 1000
        non2xx = median(r["non2xx"] for r in runs)
        base = baseline(name)
        stats = None if name == base else ratio_stats(rows, name, base)
        cpu_stats = None if name == base else cpu_ratio_stats(rows, name, base)
        cpu = median(cpu_us(r) for r in runs)
        print(
            f"| {name} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {fmt_ratio(stats)} "
            f"| {cpu:.1f} | {fmt_ratio(cpu_stats)} | {non2xx:,.0f} | {len(runs)} |"
        )
    ours = [n for n in order if n.startswith("ours-") and n.endswith("-new")]
    peers = [n for n in order if not n.startswith(("ours-", "bare")) and n.endswith("-new")]
    if ours and peers:
        print()
        print("| ours vs peer, all-new keys | req/s ratio per round (range) | CPU per request ratio (range) |")
        print("|---|---|---|")
        for mine in ours:
            for peer in peers:
                print(
                    f"| {mine} / {peer} | {fmt_ratio(ratio_stats(rows, mine, peer))} "
                    f"| {fmt_ratio(cpu_ratio_stats(rows, mine, peer))} |"
                )


if __name__ == "__main__":
    main(sys.argv[1])
