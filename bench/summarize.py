#!/usr/bin/env python3
"""Turn bench/results/dataplane.csv (one row per measurement) into a markdown
table: medians over the rounds, and ratios against the best peer (the better of
nginx and HAProxy for each metric separately, so authgate is compared with the
strongest number anyone achieved, not with one tool's average)."""
import argparse
import csv
import random
import statistics
from collections import defaultdict

PEERS = ("nginx", "haproxy")
ORDER = ("direct", "nginx", "haproxy", "authgate-static", "authgate-oauth", "authgate-pgo", "hyper-floor")


def num(v):
    return float(v) if v not in ("", None) else None


def med(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(v, best):
    if v is None or not best:
        return "–"
    return f"{v / best:.2f}×"


def median_ci(vals, resamples=2000, seed=1):
    """The median and a 95 % bootstrap interval for it (resampling the rounds;
    seeded, so the same CSV gives the same table)."""
    rng = random.Random(seed)
    meds = sorted(
        statistics.median(rng.choices(vals, k=len(vals))) for _ in range(resamples)
    )
    return statistics.median(vals), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def paired(rows, targets):
    """On a shared VM the speed drifts between rounds by more than the gaps being
    measured. Each round runs every target back to back, so the ratio to a peer
    *of the same round* cancels most of that drift; its median over the rounds is
    the steadier comparison.

    Each peer is compared separately, and the target is judged against the worse
    of the two results. Dividing by the better peer of each round instead (as
    this table did until 2026-11-29) is biased against the target: the larger of
    two noisy numbers is on average above either one's typical value, so even
    nginx averaged 0.91x against "the best peer of the round" that included itself
    (geometric mean over the rounds of the 2026-11-29 17:20 run)."""
    by_round = defaultdict(dict)
    for target, rs in rows.items():
        for r in rs:
            by_round[r["round"]][target] = r
    peers = [p for p in PEERS if p in rows]
    metrics = (("req/s", "rps"), ("CPU µs/req", "cpu_us_per_req"), ("p99", "p99_us"))
    lines = []
    for t in targets:
        if t == "direct" or not peers:
            continue
        cells = []
        for _, col in metrics:
            for p in peers:
                if p == t:
                    cells.append("1")
                    continue
                vals = [
                    num(rnd[t][col]) / num(rnd[p][col])
                    for rnd in by_round.values()
                    if t in rnd and p in rnd and num(rnd[t][col]) and num(rnd[p][col])
                ]
                if not vals:
                    cells.append("–")
                    continue
                m, lo, hi = median_ci(vals)
                cells.append(f"{m:.2f}× [{lo:.2f}–{hi:.2f}]")
        n = sum(1 for rnd in by_round.values() if t in rnd)
        lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = " | ".join(f"{name} × {p}" for name, _ in metrics for p in peers)
    return [
        "",
        "Paired ratios: in each round, the target against each peer *of that round*; the "
        "median over the rounds, and in brackets a 95 % bootstrap interval for that median. "
        "Drift of the machine between rounds cancels out. A target is ahead of the best "
        "peer when it is ahead of each peer: req/s above 1.00×, CPU and p99 below, against "
        "both; an interval that spans 1.00× is a tie at this run's noise.",
        "",
        f"| target | rounds | {head} |",
        "|---|---:|" + "---:|" * (len(metrics) * len(peers)),
    ] + lines


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--info", help="machine/parameter bullet list to include")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rows = defaultdict(list)
    with open(args.csv, newline="") as f:
        for r in csv.DictReader(f):
            rows[r["target"]].append(r)

    summary = {}
    for target, rs in rows.items():
        summary[target] = {
            "rounds": len(rs),
            "rps": med(num(r["rps"]) for r in rs),
            "rps_min": min(num(r["rps"]) for r in rs),
            "rps_max": max(num(r["rps"]) for r in rs),
            "p50": med(num(r["p50_us"]) for r in rs),
            "p99": med(num(r["p99_us"]) for r in rs),
            "p999": med(num(r["p999_us"]) for r in rs),
            "cpu": med(num(r["cpu_us_per_req"]) for r in rs),
            "user": med(num(r.get("user_us_per_req")) for r in rs),
            "rss": max((num(r["peak_rss_kib"]) or 0 for r in rs), default=None) or None,
            "errors": sum(int(r["status_errors"] or 0) + int(r["socket_errors"] or 0) for r in rs),
        }

    # Best peer value per metric: max for throughput, min for the costs.
    peers = [summary[p] for p in PEERS if p in summary]
    best = {}
    for key, pick in (("rps", max), ("p50", min), ("p99", min), ("p999", min), ("cpu", min), ("user", min), ("rss", min)):
        vals = [p[key] for p in peers if p[key] is not None]
        best[key] = pick(vals) if vals else None

    targets = [t for t in ORDER if t in summary] + sorted(t for t in summary if t not in ORDER)
    out = ["# Data-path benchmark", ""]
    if args.info:
        with open(args.info) as f:
            out += [f.read().rstrip(), ""]
    out += [
        "Medians over the rounds; `×` columns are ratios against the best peer (the better of "
        "nginx and HAProxy for that column): above 1.00× is better for req/s, below 1.00× is "
        "better for latency, CPU and memory. CPU is the proxy's user+system time per request "
        "(from /proc/PID/stat around the measured run), and `user` the part of it spent in the "
        "proxy's own code rather than the kernel; peak RSS is VmHWM of the proxy's "
        "largest process. `direct` (no proxy) is the ceiling of this machine and load generator; "
        "`hyper-floor` (bench/hyper_floor.rs) is hyper's server and client with nothing between "
        "them, the least any hyper-based proxy costs; `authgate-pgo` is authgate-static built by "
        "bench/pgo.sh (profile-guided optimisation, same source).",
        "",
        "| target | req/s | × | req/s range | p50 ms | × | p99 ms | × | p99.9 ms | × | CPU µs/req | × | user µs/req | × | peak RSS MiB | × | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        s = summary[t]
        ms = lambda us: None if us is None else us / 1000  # noqa: E731
        mib = None if s["rss"] is None else s["rss"] / 1024
        best_mib = None if best["rss"] is None else best["rss"] / 1024
        out.append(
            f"| {t} | {fmt(s['rps'])} | {ratio(s['rps'], best['rps'])} "
            f"| {fmt(s['rps_min'])}–{fmt(s['rps_max'])} "
            f"| {fmt(ms(s['p50']), 3)} | {ratio(s['p50'], best['p50'])} "
            f"| {fmt(ms(s['p99']), 3)} | {ratio(s['p99'], best['p99'])} "
            f"| {fmt(ms(s['p999']), 3)} | {ratio(s['p999'], best['p999'])} "
            f"| {fmt(s['cpu'], 1)} | {ratio(s['cpu'], best['cpu'])} "
            f"| {fmt(s['user'], 1)} | {ratio(s['user'], best['user'])} "
            f"| {fmt(mib, 1)} | {ratio(mib, best_mib)} "
            f"| {s['errors']} |"
        )
    out += paired(rows, targets)
    out += [
        "",
        "errors = non-2xx responses plus socket errors (connect/read/write/timeout) over all rounds; "
        "any non-zero value makes that row's numbers suspect.",
        "",
        "Raw numbers: `dataplane.csv` (one row per measurement), `dataplane_latency.csv` "
        "(latency percentiles); plot: `dataplane_latency.svg`.",
        "",
        "![latency distribution](dataplane_latency.svg)",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
