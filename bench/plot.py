"""Plots bench/results.json: throughput and p99 latency across connection
counts, broker against nginx serving a body of the same size, both measured
with wrk in the same run on the same machine.

usage: python bench/plot.py results.json out.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    results = json.load(open(sys.argv[1]))
    sweep = results["sweep"]
    conns = [r["connections"] for r in sweep["broker"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in [("broker", "o-"), ("nginx", "s--")]:
        label = "kraken-token-broker GET /v1/token" if name == "broker" else "nginx, static body of the same size"
        left.plot(conns, [r["rps"] / 1000 for r in sweep[name]], style, label=label)
        right.plot(conns, [r["p99_ms"] for r in sweep[name]], style, label=label)
    left.set_xscale("log", base=2)
    right.set_xscale("log", base=2)
    left.set_xlabel("concurrent connections (wrk)")
    right.set_xlabel("concurrent connections (wrk)")
    left.set_ylabel("thousand requests / s")
    right.set_ylabel("p99 latency (ms)")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    at32 = results["at_32"]
    fig.suptitle(
        f"Loopback, {results['machine']['cpus']} cores shared with wrk: at 32 connections the broker serves "
        f"{at32['broker']['rps']:,.0f}/s, {at32['ratio']:.2f}x nginx; peak RSS {at32['broker']['peak_rss_kib'] / 1024:.1f} MiB",
        fontsize=10,
    )
    left.legend(fontsize=8, loc="lower right")
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
