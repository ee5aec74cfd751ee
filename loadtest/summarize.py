#!/usr/bin/env python3
"""One Markdown table of every scenario's report.json under loadtest/out (or argv[1])."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "loadtest/out")
order = ["steady", "burst", "giant", "chaoskill", "chaosstop", "dbrestart", "leaderkill", "netcut", "soak"]
rows = []
for name in order:
    f = out / name / "report.json"
    if not f.exists():
        continue
    r = json.loads(f.read_text())
    def fmt(v, d=1):
        return "—" if v is None else f"{v:.{d}f}"
    kpi = {k["name"].split(" (")[0].split(",")[0]: k for k in r["kpis"]}
    rows.append([
        r["scenario"], f'{r["duration_sec"]:.0f}', "PASSED" if r["passed"] else "**FAILED**",
        f'{r["orders"]}/{r["tasks"]}', f'{r["units_delivered"]}/{r["units_expected"]}',
        str(r["lost_orders"] + r["lost_tasks"] + r["completed_without_a_call"]),
        str(r["invariant_violations"]), str(r["effective_duplicate_units"]),
        f'{r["raw_duplicate_calls"]} ({100 * r["raw_duplicate_rate"]:.2f} %)',
        f'{r["orphans_recovered"]}: {fmt(r["orphan_recovery_p50_sec"])}/{fmt(r["orphan_recovery_p99_sec"])}',
        ", ".join(f"{x:.1f}" for x in r["leader_failover_sec"]) or "—",
        f'{fmt(r["pickup_p50_ms"])}/{fmt(r["pickup_p99_ms"])}',
        f'{r["tasks_per_sec"]:.0f} / {r["units_per_sec"]:.0f}',
        str(r["db_connections_max"]),
        f'{fmt(r.get("claim_p99_start_ms"), 2)} → {fmt(r.get("claim_p99_end_ms"), 2)}',
        "yes" if all(k["met"] for k in r["kpis"]) else "no: " + ", ".join(k["name"].split(" (")[0] for k in r["kpis"] if not k["met"]),
    ])
head = ["scenario", "s", "verdict", "orders/tasks", "units delivered/expected", "lost (must be 0)",
        "invariant violations (must be 0)", "units counted twice (must be 0)", "raw duplicate calls",
        "orphans: rescue p50/p99 s", "leader failover s", "pickup p50/p99 ms", "tasks/s / units/s",
        "max connections", "claim p99 ms, first → last window", "KPIs met"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for r in rows:
    print("| " + " | ".join(r) + " |")
