#!/usr/bin/env python3
"""Medians of the runs bench/compare.sh wrote, one table row per target and
scenario, as Markdown.

    python3 bench/summarize.py bench-results/20261122-053000
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = [
    ("connections", "conns", "{:,.0f}"),
    ("delivered_per_s", "delivered msgs/s", "{:,.0f}"),
    ("push_rate_per_s", "pushes/s", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 ms", "{:.2f}"),
    ("latency_max_ms", "max ms", "{:.2f}"),
    ("messages_lost", "lost", "{:.0f}"),
    ("messages_duplicated", "dup", "{:.0f}"),
    ("server_rss_bytes", "server RSS MiB", "{:.1f}"),
    ("server_rss_growth_bytes_per_connection", "RSS growth B/conn", "{:,.0f}"),
    ("server_cpu_seconds", "server CPU s", "{:.2f}"),
    ("server_cpu_us_per_delivered_message", "server CPU µs/msg", "{:.2f}"),
    ("churn_connects_per_s", "connects/s", "{:,.0f}"),
    ("handshake_p99_ms", "handshake p99 ms", "{:.2f}"),
    ("generator_cpu_seconds", "gen CPU s", "{:.2f}"),
]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    groups = defaultdict(list)
    failed = []
    for path in sorted(Path(sys.argv[1]).glob("*.json")):
        target, scenario, _run = path.name[: -len(".json")].rsplit(".", 2)
        try:
            groups[(scenario, target)].append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            failed.append(path.name)
    for scenario in sorted({s for s, _ in groups}):
        rows = [(t, groups[(s, t)]) for s, t in sorted(groups) if s == scenario]
        present = [c for c in COLUMNS if any(c[0] in r for _, runs in rows for r in runs)]
        print(f"\n### {scenario}\n")
        print("| target | runs | " + " | ".join(c[1] for c in present) + " | saturated |")
        print("|---" * (len(present) + 3) + "|")
        for target, runs in rows:
            cells = []
            for key, _title, fmt in present:
                values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                if key == "server_rss_bytes" and values:
                    values = [v / 2**20 for v in values]
                cells.append(fmt.format(statistics.median(values)) if values else "")
            saturated = sum(1 for r in runs if r.get("generator_saturated"))
            print(f"| {target} | {len(runs)} | " + " | ".join(cells) + f" | {saturated} |")
    if failed:
        print("\nruns without a summary: " + ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
