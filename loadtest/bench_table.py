#!/usr/bin/env python3
"""The side-by-side table from loadtest/bench.sh's bench.jsonl: medians over the rounds (min-max),
and the ratios behind the performance targets, each taken within a round and then the median.

    python3 loadtest/bench_table.py [loadtest/out/bench/bench.jsonl]
"""
import json
import statistics
import sys
from collections import defaultdict

path = sys.argv[1] if len(sys.argv) > 1 else "loadtest/out/bench/bench.jsonl"
rows = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
if not rows:
    sys.exit(f"bench_table: no results in {path}")

# (row name) -> {round: value}
work = defaultdict(dict)
p50 = defaultdict(dict)
p99 = defaultdict(dict)
jobs = {}
intake = defaultdict(dict)    # orders (or commits) per second
intake_p = defaultdict(dict)  # (POST p50, p99) ms
enqueue = defaultdict(dict)   # peers' bulk enqueue, jobs/s
peer_names = []
emptied = set()  # ceiling cells that ran out of rows before their time was up
for o in rows:
    r = o.get("rep", 1)
    if o.get("system") == "tally":
        t = o["throughput"]
        for run in t["runs"]:
            shape = "many orders of 100 tasks" if run["shape"] == "many_orders" else "one order of every task"
            name = f"tally: {shape}, {run['workers']} worker{'s' if run['workers'] > 1 else ''}"
            work[name][r] = run["tasks_per_sec_median"]
            jobs[name] = t["tasks"]
        name = "tally: idle pickup (1 worker)"
        p50[name][r], p99[name][r] = o["pickup_ms"]["p50"], o["pickup_ms"]["p99"]
    elif o.get("system") == "raw-sql":
        name = f"raw SQL: batch {o['batch']}, {o['clients']} client{'s' if o['clients'] > 1 else ''}"
        work[name][r] = o["tasks_per_s"]
        jobs[name] = o.get("completed")
        if o.get("pending_left") == 0:
            emptied.add(name)
    elif o.get("system") == "tally-intake":
        name = ("tally: POST /api/orders/batch, 1,000 a call, 4 clients" if o.get("batch")
                else f"tally: POST /api/orders, one order a request, {o['clients']} clients")
        intake[name][r] = o["orders_per_s"]
        intake_p[name][r] = (o.get("post_p50_ms"), o.get("post_p99_ms"))
    elif o.get("system") == "intake-ceiling":
        intake["pgbench: one single-row INSERT per commit, 8 clients"].setdefault(r, o["commits_per_s"])
    else:
        name = f"{o['system']} {o.get('version', '')}".strip()
        enqueue[name][r] = o.get("enqueue_per_s")
        if name not in peer_names:
            peer_names.append(name)
        work[name][r] = o["work_per_s"]
        p50[name][r], p99[name][r] = o["pickup_p50_ms"], o["pickup_p99_ms"]
        jobs[name] = o.get("n")

rounds = sorted({o.get("rep", 1) for o in rows})


def med(d):
    v = [x for x in d.values() if x is not None]
    if not v:
        return "—"
    m = statistics.median(v)
    if len(v) == 1:
        return f"{m:,.0f}" if m >= 100 else f"{m:.1f}"
    fmt = (lambda x: f"{x:,.0f}") if m >= 100 else (lambda x: f"{x:.1f}")
    return f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))})"


print(f"Rounds: {len(rounds)}. Medians over the rounds, range in brackets.\n")
print("| system and configuration | tasks | no-op work, tasks/s | idle pickup p50 ms | idle pickup p99 ms |")
print("|---|---|---|---|---|")
names = [n for n in work if n.startswith("tally")] + \
    [n for n in p50 if n.startswith("tally")] + peer_names + \
    [n for n in work if n.startswith("raw SQL")]
for n in dict.fromkeys(names):
    j = jobs.get(n)
    mark = " ¹" if n in emptied else ""
    print(f"| {n}{mark} | {'' if j is None else f'{j:,}'} | {med(work.get(n, {}))} | {med(p50.get(n, {}))} | {med(p99.get(n, {}))} |")
if emptied:
    print("\n¹ In at least one round this cell completed every prefilled row before its 10 s were up, "
          "so its figure is a lower bound of the ceiling (raise CEILING_ROWS), and a ratio to it an upper bound.")


def per_round(f):
    out = []
    for r in rounds:
        try:
            v = f(r)
        except (KeyError, ValueError, ZeroDivisionError):
            continue
        if v is not None:
            out.append(v)
    return out


def best(prefix, r):
    return max(work[n][r] for n in work if n.startswith(prefix) and r in work[n])


def fastest_peer(r):
    return max(work[n][r] for n in peer_names if r in work[n])


def shape_ratio(r):
    many = max(v[r] for n, v in work.items() if n.startswith("tally: many") and r in v)
    single = max(v[r] for n, v in work.items() if n.startswith("tally: one order") and r in v)
    return single / many


targets = [
    ("Tally's best cell ÷ the fastest peer", lambda r: best("tally", r) / fastest_peer(r), "≥ 1.5", lambda x: x >= 1.5),
    ("Tally's best cell ÷ the raw-SQL ceiling's best cell", lambda r: best("tally", r) / best("raw SQL", r), "≥ 0.60", lambda x: x >= 0.6),
    ("one order of every task ÷ many orders (best cell of each)", shape_ratio, "≥ 0.80", lambda x: x >= 0.8),
    ("Tally idle pickup p99, ms", lambda r: p99["tally: idle pickup (1 worker)"][r], "≤ 10", lambda x: x <= 10),
]
print("\n| ratio (taken within each round) | median | per round | target | met |")
print("|---|---|---|---|---|")
for label, f, target, ok in targets:
    v = per_round(f)
    if not v:
        print(f"| {label} | — | — | {target} | not measured |")
        continue
    m = statistics.median(v)
    print(f"| {label} | {m:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {target} | {'yes' if ok(m) else '**no**'} |")


if intake:
    print("\n**Intake.** Single-unit orders accepted over HTTP (tally serve, every role), the same "
          "cluster's single-row-commit ceiling, and the peers' bulk enqueue (in-process, 1,000 "
          "jobs a call; awa: one COPY per call) for scale.\n")
    print("| intake | per second | POST p50 / p99 ms |")
    print("|---|---|---|")
    for n in intake:
        ps = intake_p.get(n, {})
        pp = " / ".join(f"{statistics.median([v[i] for v in ps.values() if v[i] is not None]):.1f}"
                        for i in (0, 1)) if ps else ""
        print(f"| {n} | {med(intake[n])} | {pp} |")
    for n in peer_names:
        if enqueue.get(n):
            print(f"| {n}: bulk enqueue | {med(enqueue[n])} | |")
    one = next((n for n in intake if n.startswith("tally: POST /api/orders,")), None)
    bulk = next((n for n in intake if n.startswith("tally: POST /api/orders/batch")), None)
    ceil = "pgbench: one single-row INSERT per commit, 8 clients"
    checks = [
        ("one order a request, orders/s", lambda r: intake[one][r], "≥ 5,000", lambda x: x >= 5000),
        ("one order a request ÷ single-row-commit ceiling", lambda r: intake[one][r] / intake[ceil][r], "≥ 0.30", lambda x: x >= 0.3),
        ("bulk endpoint, orders/s", lambda r: intake[bulk][r], "≥ 50,000", lambda x: x >= 50000),
    ]
    print("\n| intake target | median | per round | target | met |")
    print("|---|---|---|---|---|")
    for label, f, target, ok in checks:
        v = per_round(f)
        if not v:
            print(f"| {label} | — | — | {target} | not measured |")
            continue
        m = statistics.median(v)
        fmt = (lambda x: f"{x:,.0f}") if m >= 100 else (lambda x: f"{x:.2f}")
        print(f"| {label} | {fmt(m)} | {', '.join(fmt(x) for x in v)} | {target} | {'yes' if ok(m) else '**no**'} |")
