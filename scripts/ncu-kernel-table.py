#!/usr/bin/env python3
"""GPU time per kernel from an ncu CSV of gpu__time_duration.sum, largest first.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv PROGRAM ARGS > k.csv
    python3 scripts/ncu-kernel-table.py k.csv [--top 25]

Prints the share of the profiled GPU time, the milliseconds and the launch count of each kernel
(names cut to 90 characters). nsys is not available on the GPU machine; this is its stand-in.
"""
import argparse
import collections
import csv
import sys

UNITS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    lines = open(args.csv, encoding="utf-8", errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"ncu-kernel-table: {args.csv} has no ncu CSV header (\"ID\",...): did ncu fail?")
    agg = collections.defaultdict(lambda: [0, 0.0])
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "nsecond")
        if unit not in UNITS:
            sys.exit(f"ncu-kernel-table: unknown time unit {unit!r}")
        ns = float(row["Metric Value"].replace(",", "")) * UNITS[unit]
        a = agg[row["Kernel Name"][:90]]
        a[0] += 1
        a[1] += ns
    total = sum(v for _, v in agg.values())
    if not total:
        sys.exit("ncu-kernel-table: no kernel times in the file")
    print(f"{sum(c for c, _ in agg.values())} kernels, {total / 1e6:.2f} ms of GPU time")
    print("| share | ms | launches | kernel |\n|---|---|---|---|")
    for name, (count, ns) in sorted(agg.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"| {100 * ns / total:.1f}% | {ns / 1e6:.2f} | {count} | `{name}` |")


if __name__ == "__main__":
    main()
