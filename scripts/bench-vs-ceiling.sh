#!/usr/bin/env bash
# Measures Tally next to the machine's raw-SQL ceiling, on one durable PostgreSQL cluster, in
# one run, so the ratio means something on a noisy shared machine.
#
#   scripts/bench-vs-ceiling.sh [TASKS]      (default 200000)
#
# Needs ../shared/bench (pg.sh and probe.sh, the shared benchmark harness) beside this repo,
# pgbench, and a release build (it builds one). Prints `tally bench` JSON, then the ceiling
# probe's JSON lines for claim+complete batches of 1000 with 1, 2 and 4 clients.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
TASKS=${1:-200000}
[ -x "$SHARED/pg.sh" ] || { echo "shared bench harness not found at $SHARED (set SHARED_BENCH)" >&2; exit 1; }
cargo build --release --locked >&2
export BENCH_PGDIR=${BENCH_PGDIR:-/tmp/tally-bench-ceiling}
"$SHARED/pg.sh" stop >/dev/null 2>&1 || true
"$SHARED/pg.sh" start >/dev/null
trap '"$SHARED/pg.sh" stop >/dev/null 2>&1 || true' EXIT
url=$("$SHARED/pg.sh" freshdb tally_bench)
echo "== tally bench ($TASKS tasks), $(date -u +%FT%TZ), load1 $(cut -d' ' -f1 /proc/loadavg)" >&2
RUST_LOG=warn ./target/release/tally bench --database-url "$url" --tasks "$TASKS"
echo "== raw-SQL ceiling (pgbench lifecycle, B=1000), load1 $(cut -d' ' -f1 /proc/loadavg)" >&2
OUTDIR=$(mktemp -d) REPS=1 BATCHES=1000 CLIENTS="1 2 4" "$SHARED/probe.sh" lifecycle
