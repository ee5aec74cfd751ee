#!/usr/bin/env bash
# Tally side by side with the peers of the shared benchmark harness (../shared/bench) and the
# machine's raw-SQL ceiling, on one durable PostgreSQL 15 cluster, in one run, so the ratios
# mean something on a noisy 2-core machine.
#
#   bash loadtest/bench.sh                 # REPS=3 rounds, the order rotated each round
#   python3 loadtest/bench_table.py        # the table, from loadtest/out/bench/bench.jsonl
#
# Each round runs, in rotated order:
#   tally      `tally bench`: no-op handler, full claim -> complete cycle on TALLY_TASKS tasks
#              (many orders of 100 tasks, and one order of TALLY_TASKS single units) with
#              TALLY_WORKERS in-process workers (each its own claim loop and completer, like a
#              pod), then idle pickup (submit -> handler start, TALLY_PICKUPS samples: 300 by
#              default, so the p99 is an estimate and not simply the largest of 50)
#   peers      `run-peer.sh NAME N` for each of PEERS (bulk enqueue N, one worker process with
#              concurrency 10 until drained, then 50 idle pickups)
#   raw-sql    `probe.sh lifecycle`, batch 1000, 1/2/4 clients (claim with SKIP LOCKED, mark
#              done: two commits per batch, nothing else)
#   tally-intake  `loadtest/intake-bench.sh`: single-unit orders over HTTP, one per request
#              from 64 keep-alive clients (wrk) against `tally serve` with every role, next to
#              pgbench's single-row-commit ceiling on the same cluster; then the same through
#              POST /api/orders/batch (1,000 orders a call, 4 clients)
#
# Knobs: REPS (3), TALLY_ITEMS ("tally tally-intake"), TALLY_TASKS (1000000), TALLY_WORKERS (2), TALLY_PICKUPS (300), CEILING_ROWS (3000000),
# PEERS (below), OUTDIR (loadtest/out/bench),
# SHARED_BENCH (../shared/bench), SKIP_BUILD=1 to use the existing target/release/tally.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
REPS=${REPS:-3}
TALLY_TASKS=${TALLY_TASKS:-1000000}
TALLY_WORKERS=${TALLY_WORKERS:-2}
TALLY_PICKUPS=${TALLY_PICKUPS:-300}
CEILING_ROWS=${CEILING_ROWS:-3000000}
PEERS=${PEERS:-"graphile-worker-batched:200000 graphile-worker:50000 pg-boss:100000 pgqueuer:50000 awa:50000"}
TALLY_ITEMS=${TALLY_ITEMS:-"tally tally-intake"}
OUT=${OUTDIR:-loadtest/out/bench}
[ -x "$SHARED/pg.sh" ] || { echo "bench.sh: the shared harness is not at $SHARED (set SHARED_BENCH)" >&2; exit 1; }
mkdir -p "$OUT"
: >"$OUT/bench.jsonl"
[ "${SKIP_BUILD:-}" = 1 ] || cargo build --release --locked -p tally >&2
bash "$SHARED/install-peers.sh" node >&2
bash "$SHARED/install-peers.sh" py >&2
case " $PEERS " in *" awa:"*) bash "$SHARED/install-peers.sh" awa >&2 ;; esac

export BENCH_PGDIR=${BENCH_PGDIR:-/tmp/tally-sbs-pg}
"$SHARED/pg.sh" stop >/dev/null 2>&1 || true
"$SHARED/pg.sh" start >&2
trap '"$SHARED/pg.sh" stop >/dev/null 2>&1 || true' EXIT
"$SHARED/pg.sh" settings >"$OUT/settings.txt" 2>&1 || true

load1() { cut -d' ' -f1 /proc/loadavg; }
# Appends one JSON object (stdin) to bench.jsonl with the round and a few fields added.
record() { python3 -c '
import json, sys
extra = json.loads(sys.argv[1])
for line in sys.stdin.read().splitlines():
    line = line.strip()
    if line.startswith("{"):
        o = json.loads(line); o.update(extra); print(json.dumps(o))
' "$1" | tee -a "$OUT/bench.jsonl"; }

run_tally() {
  local url l0 t0
  url=$("$SHARED/pg.sh" freshdb tally_bench)
  l0=$(load1); t0=$(date +%s)
  RUST_LOG=warn ./target/release/tally bench --database-url "$url" --tasks "$TALLY_TASKS" \
      --workers "$TALLY_WORKERS" --shapes many,single --reps 1 --pickup-samples "$TALLY_PICKUPS" >"$OUT/tally-$1.json"
  python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$OUT/tally-$1.json" \
    | record "{\"system\": \"tally\", \"rep\": $1, \"load1_before\": $l0, \"wall_s\": $(( $(date +%s) - t0 ))}"
}
run_peer() { # name n rep
  local line
  line=$("$SHARED/run-peer.sh" "$1" "$2") || { echo "bench.sh: $1 failed" >&2; return 0; }
  echo "$line" | record "{\"rep\": $3}"
}
run_ceiling() {
  local tmp; tmp=$(mktemp -d)
  # ROWS: the probe runs each cell for 10 s on a prefilled table; at its default 1,000,000
  # rows the 2- and 4-client cells emptied the table before the 10 s were up (2026-11-24),
  # so they measured the table size, not the ceiling.
  OUTDIR=$tmp REPS=1 BATCHES=1000 CLIENTS="1 2 4" ROWS=$CEILING_ROWS "$SHARED/probe.sh" lifecycle >/dev/null
  grep '"kind":"lifecycle"' "$tmp/probe.jsonl" | record "{\"system\": \"raw-sql\", \"rep\": $1}"
  rm -rf "$tmp"
}

run_intake() { # rep: the intake cells on their own cluster (the script starts and stops one)
  local tmp; tmp=$(mktemp -d)
  BENCH_PGDIR=/tmp/tally-sbs-intake-pg OUTDIR="$tmp/one" REPS=1 bash loadtest/intake-bench.sh >/dev/null
  BENCH_PGDIR=/tmp/tally-sbs-intake-pg OUTDIR="$tmp/batch" REPS=1 CLIENTS=4 BATCH=1000 bash loadtest/intake-bench.sh >/dev/null
  cat "$tmp/one/intake.jsonl" "$tmp/batch/intake.jsonl" \
    | python3 -c 'import json,sys
for l in sys.stdin:
    o = json.loads(l); o["system"] = "tally-intake" if o["system"] == "tally" else "intake-ceiling"; print(json.dumps(o))' \
    | record "{\"rep\": $1}"
  rm -rf "$tmp"
}

read -r -a items <<<"$TALLY_ITEMS $PEERS raw-sql"
for rep in $(seq 1 "$REPS"); do
  k=${#items[@]}
  for ((i = 0; i < k; i++)); do
    item=${items[$(( (i + rep - 1) % k ))]}
    echo "== round $rep: $item ($(date -u +%T), load1 $(load1))" >&2
    case $item in
      tally) run_tally "$rep" ;;
      tally-intake) run_intake "$rep" ;;
      raw-sql) run_ceiling "$rep" ;;
      *) run_peer "${item%%:*}" "${item##*:}" "$rep" ;;
    esac
  done
done
python3 loadtest/bench_table.py "$OUT/bench.jsonl" | tee "$OUT/bench.md"
