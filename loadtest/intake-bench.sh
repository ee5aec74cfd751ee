#!/usr/bin/env bash
# Intake at API speed: single-unit orders over HTTP, one order per request, each with its own
# Idempotency-Key, from C keep-alive clients (wrk), against `tally serve` with every role on
# one durable PostgreSQL 15 cluster; and, in the same run, the machine's single-row-commit
# ceiling (pgbench, 8 clients, one single-row INSERT per commit), so the ratio means something
# on a noisy 2-core machine. Rounds alternate ceiling and Tally.
#
#   bash loadtest/intake-bench.sh            # prints one JSON line per cell, then a summary
#
# Knobs: REPS (3), SECS (10 per cell), CLIENTS (64), BIN (target/release/tally),
# OUTDIR (loadtest/out/intake), SHARED_BENCH (../shared/bench), BATCH (0: POST /api/orders;
# N: POST /api/orders/batch with N orders per call), EXTRA_ENV (extra env for tally serve).
# Each Tally cell checks afterwards that the orders in the database equal the 201s wrk saw.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
REPS=${REPS:-3}
SECS=${SECS:-10}
CLIENTS=${CLIENTS:-64}
BIN=${BIN:-target/release/tally}
BATCH=${BATCH:-0}
OUT=${OUTDIR:-loadtest/out/intake}
command -v wrk >/dev/null || { echo "intake-bench.sh: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "intake-bench.sh: no $BIN (cargo build --release)" >&2; exit 1; }
mkdir -p "$OUT"
: >"$OUT/intake.jsonl"
export BENCH_PGDIR=${BENCH_PGDIR:-/tmp/tally-intake-pg}
"$SHARED/pg.sh" stop >/dev/null 2>&1 || true
"$SHARED/pg.sh" start >&2
tally_pid=
cleanup() {
  [ -n "$tally_pid" ] && kill "$tally_pid" 2>/dev/null || true
  "$SHARED/pg.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
KEY="intake-bench-admin-key-0123456789"
API=127.0.0.1:18181
METRICS=127.0.0.1:19191

cat >"$OUT/post.lua" <<EOF
-- One single-unit order per request, a fresh Idempotency-Key each time.
-- (Each wrk thread has its own Lua state with the same random sequence: setup() numbers them.)
local counter = 0
local prefix = ""
local batch = $BATCH
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  prefix = string.format("%s-%d", os.time(), tid)
end
local function one(k)
  return '{"kind":"simulate","target":"acct-' .. (k % 1000) .. '","quantity":1}'
end
function request()
  counter = counter + 1
  if batch == 0 then
    return wrk.format("POST", "/api/orders", {
      ["Content-Type"] = "application/json", ["X-Api-Key"] = "$KEY",
      ["Idempotency-Key"] = prefix .. "-" .. counter }, one(counter))
  end
  local items = {}
  for i = 1, batch do
    items[i] = '{"idempotency_key":"' .. prefix .. '-' .. counter .. '-' .. i .. '","kind":"simulate","target":"acct-' .. (i % 1000) .. '","quantity":1}'
  end
  return wrk.format("POST", "/api/orders/batch", {
    ["Content-Type"] = "application/json", ["X-Api-Key"] = "$KEY" },
    '{"orders":[' .. table.concat(items, ",") .. ']}')
end
EOF

ceiling() { # rep
  local url
  url=$("$SHARED/pg.sh" freshdb ceiling)
  psql -q "$url" -c "CREATE TABLE t (id bigserial PRIMARY KEY, payload text NOT NULL)" >/dev/null
  echo "INSERT INTO t (payload) VALUES ('x');" >"$OUT/insert.pgbench"
  local tps
  tps=$(pgbench -n -M prepared -c 8 -j 2 -T "$SECS" -f "$OUT/insert.pgbench" "$url" 2>/dev/null \
    | awk '/^tps = /{print $3; exit}')
  echo "{\"system\": \"ceiling\", \"rep\": $1, \"commits_per_s\": ${tps:-0}}" | tee -a "$OUT/intake.jsonl"
}

tally_cell() { # rep
  local url log
  url=$("$SHARED/pg.sh" freshdb tally_intake)
  log="$OUT/tally-$1.log"
  "$BIN" migrate --database-url "$url" >/dev/null
  env RUST_LOG=warn TALLY_DATABASE_URL="$url" TALLY_ADMIN_API_KEY="$KEY" TALLY_API_ADDR=$API \
    TALLY_METRICS_ADDR=$METRICS TALLY_SIMULATE_LATENCY_MS=0 ${EXTRA_ENV:-} \
    "$BIN" serve >"$log" 2>&1 &
  tally_pid=$!
  for _ in $(seq 1 100); do
    curl -sf -H "X-Api-Key: $KEY" "http://$API/api/admin/control" >/dev/null 2>&1 && break
    sleep 0.1
  done
  local before after wrk_out
  before=$(psql -qtA "$url" -c "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
  wrk_out=$(wrk -t "$(( CLIENTS < 2 ? 1 : 2 ))" -c "$CLIENTS" -d "${SECS}s" --latency -s "$OUT/post.lua" "http://$API" 2>&1)
  echo "$wrk_out" >"$OUT/wrk-$1.txt"
  sleep 2
  after=$(psql -qtA "$url" -c "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
  local orders
  orders=$(psql -qtA "$url" -c "SELECT count(*) FROM orders")
  kill "$tally_pid"; wait "$tally_pid" 2>/dev/null || true; tally_pid=
  python3 - "$1" "$orders" "$before" "$after" "$BATCH" "$CLIENTS" "$OUT/wrk-$1.txt" <<'PY' | tee -a "$OUT/intake.jsonl"
import json, re, sys
rep, orders, before, after, batch, clients, path = sys.argv[1:]
text = open(path).read()
def num(pat, default=0.0):
    m = re.search(pat, text)
    return float(m.group(1)) if m else default
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
lat = {}
for p in ("50", "99"):
    m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M)
    lat[p] = ms(*m.groups()) if m else None
requests = num(r"(\d+) requests in")
secs = num(r"requests in ([\d.]+)s")
non2xx = num(r"Non-2xx or 3xx responses: (\d+)")
errors = sum(float(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
ok = requests - non2xx
per = max(int(batch), 1)
print(json.dumps({
    "system": "tally", "rep": int(rep), "clients": int(clients), "batch": int(batch),
    "requests": int(requests), "non_2xx": int(non2xx), "socket_errors": int(errors),
    "orders_per_s": round(ok * per / secs, 1) if secs else 0,
    "orders_in_db": int(orders), "orders_expected": int(ok * per),
    "post_p50_ms": lat["50"], "post_p99_ms": lat["99"],
    "commits_per_order": round((int(after) - int(before)) / max(int(orders), 1), 3),
}))
PY
}

for rep in $(seq 1 "$REPS"); do
  if (( rep % 2 )); then ceiling "$rep"; tally_cell "$rep"; else tally_cell "$rep"; ceiling "$rep"; fi
done
python3 - "$OUT/intake.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ceil = [r["commits_per_s"] for r in rows if r["system"] == "ceiling"]
tally = [r for r in rows if r["system"] == "tally"]
acc = [r["orders_per_s"] for r in tally]
med = lambda xs: statistics.median(xs) if xs else 0
print(f"ceiling (pgbench, 8 clients, single-row INSERT): median {med(ceil):,.0f} commits/s  {[round(c) for c in ceil]}")
print(f"tally accepted: median {med(acc):,.0f} orders/s  {acc}")
print(f"ratio to the ceiling: {med(acc) / med(ceil):.3f}" if ceil and med(ceil) else "no ceiling")
print(f"POST p50 / p99 ms (medians): {med([r['post_p50_ms'] for r in tally])} / {med([r['post_p99_ms'] for r in tally])}")
print(f"commits per order: {[r['commits_per_order'] for r in tally]}")
# Requests still in flight when wrk stops may have committed without wrk counting them.
bad = [r for r in tally if not 0 <= r["orders_in_db"] - r["orders_expected"] <= r["clients"] * max(r["batch"], 1)]
print("orders in the database match the 201s (plus at most the requests in flight at the end): "
      + ("yes" if not bad else f"NO: {bad}"))
PY
