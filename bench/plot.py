#!/usr/bin/env python3
"""Draw the latency distribution per proxy as a hand-written SVG (no plotting
library needed). Input: dataplane_latency.csv (round,target,percentile,latency_us).
The x axis is the percentile on a "nines" scale (50, 90, 99, 99.9, 99.99 equally
spaced, i.e. -log10(1 - p/100)), the y axis the latency in ms on a log scale;
for each target the median over the rounds is drawn."""
import argparse
import csv
import math
import statistics
from collections import defaultdict

COLORS = {
    "direct": "#888888",
    "nginx": "#2ca02c",
    "haproxy": "#1f77b4",
    "authgate-static": "#d62728",
    "authgate-oauth": "#ff7f0e",
    "authgate-pgo": "#bcbd22",
    "hyper-floor": "#9467bd",
}
EXTRA = ["#8c564b", "#e377c2", "#17becf"]
W, H = 760, 440
ML, MR, MT, MB = 70, 170, 40, 50  # margins: the legend sits on the right


def nines(p):
    return -math.log10(1 - p / 100)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="Latency distribution per proxy (median of rounds)")
    args = ap.parse_args()

    data = defaultdict(lambda: defaultdict(list))  # target -> pct -> [us]
    with open(args.csv, newline="") as f:
        for r in csv.DictReader(f):
            data[r["target"]][float(r["percentile"])].append(float(r["latency_us"]))
    series = {}
    for t, by_p in data.items():
        pts = sorted((p, statistics.median(v) / 1000) for p, v in by_p.items() if p < 100)
        series[t] = [(p, max(ms, 1e-3)) for p, ms in pts]
    if not series:
        raise SystemExit("plot: no data")

    all_ms = [ms for pts in series.values() for _, ms in pts]
    y_lo = 10 ** math.floor(math.log10(min(all_ms)))
    y_hi = 10 ** math.ceil(math.log10(max(all_ms)))
    if y_hi <= y_lo:
        y_hi = y_lo * 10
    all_p = [p for pts in series.values() for p, _ in pts]
    x_lo, x_hi = nines(min(all_p)), nines(max(all_p))
    pw, ph = W - ML - MR, H - MT - MB

    def X(p):
        return ML + (nines(p) - x_lo) / max(x_hi - x_lo, 1e-9) * pw

    def Y(ms):
        return MT + ph - (math.log10(ms) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo)) * ph

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{ML}" y="22" font-size="15" font-weight="bold">{args.title}</text>',
    ]
    # Grid: percentile ticks and decades of latency.
    for p in (50, 90, 99, 99.9, 99.99):  # lower percentiles crowd the left edge
        if min(all_p) <= p <= max(all_p):
            x = X(p)
            svg.append(f'<line x1="{x:.1f}" y1="{MT}" x2="{x:.1f}" y2="{MT + ph}" stroke="#ddd"/>')
            svg.append(f'<text x="{x:.1f}" y="{MT + ph + 16}" text-anchor="middle">p{p:g}</text>')
    decade = y_lo
    while decade <= y_hi * 1.0001:
        for m in (1, 2, 5):
            v = decade * m
            if y_lo <= v <= y_hi * 1.0001:
                y = Y(v)
                svg.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{ML + pw}" y2="{y:.1f}" stroke="{"#ccc" if m == 1 else "#eee"}"/>')
                svg.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        decade *= 10
    svg.append(f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    svg.append(f'<text x="{ML + pw / 2}" y="{H - 10}" text-anchor="middle">percentile</text>')
    svg.append(f'<text x="16" y="{MT + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {MT + ph / 2})">latency (ms, log)</text>')

    extra = iter(EXTRA)
    for i, (t, pts) in enumerate(sorted(series.items(), key=lambda kv: list(COLORS).index(kv[0]) if kv[0] in COLORS else 99)):
        color = COLORS.get(t) or next(extra, "#000")
        path = " ".join(f"{X(p):.1f},{Y(ms):.1f}" for p, ms in pts)
        svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p, ms in pts:
            svg.append(f'<circle cx="{X(p):.1f}" cy="{Y(ms):.1f}" r="2.5" fill="{color}"><title>{t} p{p:g}: {ms:.3f} ms</title></circle>')
        ly = MT + 10 + i * 20
        svg.append(f'<line x1="{ML + pw + 15}" y1="{ly}" x2="{ML + pw + 40}" y2="{ly}" stroke="{color}" stroke-width="3"/>')
        svg.append(f'<text x="{ML + pw + 46}" y="{ly + 4}">{t}</text>')
    svg.append("</svg>")
    with open(args.out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
