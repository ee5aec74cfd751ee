#!/usr/bin/env bash
# Where a `tally bench` run spends its database time, over time: runs one throughput cell on
# the shared harness's durable cluster with pg_stat_statements loaded, samples it every 2 s,
# and prints 10 s windows of claimed tasks/s and the mean time per call of the claim and of
# the completion write (APPLY), then the statements by total time.
#
#   bash loadtest/profile.sh                          # 1,000,000 tasks, many orders, 2 workers
#   TASKS=200000 SHAPE=single bash loadtest/profile.sh
#   ANALYZE_AFTER=12 bash loadtest/profile.sh         # ANALYZE the task table 12 s into the run
#   BIN=/path/to/other/tally bash loadtest/profile.sh # another build, same cluster
#
# A window that drops to a fraction of its neighbours with APPLY's time per call up tenfold
# is the plan flip described in RESULTS.md ("Why the 1,000,000-task cells ran slow").
# Knobs: TASKS (1000000), SHAPE (many), WORKERS (2), BIN (target/release/tally),
# BENCH_PGDIR (/tmp/tally-prof-pg; kept running between calls, `pg.sh stop` removes it),
# SHARED_BENCH (../shared/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
TASKS=${TASKS:-1000000}
SHAPE=${SHAPE:-many}
WORKERS=${WORKERS:-2}
BIN=${BIN:-./target/release/tally}
export BENCH_PGDIR=${BENCH_PGDIR:-/tmp/tally-prof-pg}
[ -x "$BIN" ] || cargo build --release --locked -p tally >&2

"$SHARED/pg.sh" start >/dev/null
admin=$("$SHARED/pg.sh" url)
if [ "$(psql -XAtq "$admin" -c 'SHOW shared_preload_libraries')" != pg_stat_statements ]; then
  psql -XAtq "$admin" -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
  as_pg=(); [ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
  "${as_pg[@]}" "${PGBIN:-/usr/lib/postgresql/15/bin}/pg_ctl" -D "$BENCH_PGDIR/data" restart -w \
      -l "$BENCH_PGDIR/restart.log" >/dev/null
fi
url=$("$SHARED/pg.sh" freshdb tally_profile 2>/dev/null)
psql -XAtq "$url" -c "CREATE EXTENSION pg_stat_statements" -c "SELECT pg_stat_statements_reset()" >/dev/null

samples=$(mktemp)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -f "$samples"' EXIT
# One line every 2 s: epoch seconds, then calls/ms/rows of the claim and of APPLY.
(while sleep 2; do
  psql -XAtq -F' ' "$url" -c "
    SELECT extract(epoch FROM now())::int,
      coalesce(sum(calls) FILTER (WHERE query LIKE '%WITH ctl AS%'), 0),
      coalesce(round(sum(total_exec_time) FILTER (WHERE query LIKE '%WITH ctl AS%')), 0),
      coalesce(sum(rows) FILTER (WHERE query LIKE '%WITH ctl AS%'), 0),
      coalesce(sum(calls) FILTER (WHERE query LIKE '%WITH input AS%unnest(\$1::bigint%'), 0),
      coalesce(round(sum(total_exec_time) FILTER (WHERE query LIKE '%WITH input AS%unnest(\$1::bigint%')), 0)
    FROM pg_stat_statements" || true
done) >"$samples" &

if [ -n "${ANALYZE_AFTER:-}" ]; then
  (until psql -XAtq "$url" -c "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%WITH ctl AS%'
        AND state = 'active' AND pid <> pg_backend_pid()" | grep -q 1; do sleep 0.5; done
   sleep "$ANALYZE_AFTER"
   psql -XAtq "$url" -c "ANALYZE order_tasks" -c "ANALYZE orders"
   echo "ANALYZE ran $ANALYZE_AFTER s into the run" >&2) &
fi

RUST_LOG=warn "$BIN" bench --database-url "$url" --tasks "$TASKS" --workers "$WORKERS" \
    --shapes "$SHAPE" --reps 1 --pickup-samples 0 >/dev/null

python3 - "$samples" <<'EOF'
import sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 6]
rows = [r for r in rows if r[1] > 0]  # from the first claim on
print("10 s window | claimed tasks/s | claim ms/call (tasks/call) | APPLY ms/call")
for a, b in zip(rows[::5], rows[5::5]):
    dt = max(b[0] - a[0], 1)
    calls, ms, tasks = b[1] - a[1], b[2] - a[2], b[3] - a[3]
    acalls, ams = b[4] - a[4], b[5] - a[5]
    print(f"{a[0] - rows[0][0]:>4}-{b[0] - rows[0][0]:<4} s | {tasks / dt:>13,.0f} | "
          f"{ms / max(calls, 1):>8.1f} ({tasks / max(calls, 1):.0f}) | {ams / max(acalls, 1):.1f}")
EOF
psql -XAtq -F' | ' "$url" -c "
  SELECT round(total_exec_time)::bigint || ' ms', calls || ' calls',
         left(regexp_replace(query, '\s+', ' ', 'g'), 80)
  FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8"
