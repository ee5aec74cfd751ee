#!/usr/bin/env bash
# End to end with a real Prometheus: a running Tally (api+generator+sweeper and two workers,
# from `tally demo --keep-running`) is scraped every second on loopback while an order is
# delivered; then the dashboard's key series are queried, and every process's exposition
# passes `promtool check metrics`.
#
#   bash .ci/prometheus-e2e.sh [path/to/tally]     (default ./target/release/tally)
set -euo pipefail
cd "$(dirname "$0")/.."
tally=${1:-./target/release/tally}
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
work=$(mktemp -d)
base=19100          # metrics ports: 19100 (api/generator/sweeper), 19101.. (workers)
prom=127.0.0.1:19190
key="e2e-admin-key-0123456789"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/prometheus.yml" <<YAML
global: { scrape_interval: 1s, evaluation_interval: 1s }
scrape_configs:
  - job_name: tally
    static_configs:
      - targets: ['127.0.0.1:$base', '127.0.0.1:$((base + 1))', '127.0.0.1:$((base + 2))']
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="$prom" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)

# 400 tasks of ~100 units at ~150 ms each on 2 workers x 4 slots: several seconds of delivery.
"$tally" demo --workers 2 --quantity 40000 --chunk-size 100 --latency-ms 150 --keep-running \
  --api-addr 127.0.0.1:19180 --api-key "$key" --metrics-port-base $base >"$work/demo.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 180); do
  grep -q "still running" "$work/demo.log" && break
  kill -0 "${pids[1]}" 2>/dev/null || { cat "$work/demo.log"; echo "the demo exited early"; exit 1; }
  sleep 1
done
grep -q "still running" "$work/demo.log" || { cat "$work/demo.log"; echo "the demo never finished"; exit 1; }
sleep 6   # a few more scrapes after the order completed (and a cluster-gauge refresh)

query() { # prints the first value of an instant query, or "none"
  curl -sfG "http://$prom/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'
}
fail=0
check() { # check NAME EXPR PYTHON-CONDITION-ON-v
  local v; v=$(query "$2")
  if [ "$v" != none ] && python3 -c "import sys; v=float(sys.argv[1]); sys.exit(0 if ($3) else 1)" "$v"; then
    printf '  ok    %-34s %s = %s\n' "$1" "$2" "$v"
  else
    printf '  FAIL  %-34s %s = %s (want %s)\n' "$1" "$2" "$v" "$3"; fail=1
  fi
}
echo "querying Prometheus ($prom):"
check "targets up"            'sum(up{job="tally"})'                                   'v == 3'
check "units delivered"       'sum(delivery_units_total{outcome="delivered"})'         'v == 40000'
check "tasks completed"       'sum(delivery_tasks_total{status="COMPLETED"})'          'v == 400'
check "delivery rate seen"    'max_over_time(sum(rate(delivery_units_total{outcome="delivered"}[5s]))[2m:1s])' 'v > 0'
check "one leader"            'sum(tally_leader{role="sweeper"})'                      'v == 1'
check "active workers"        'max(delivery_worker_active)'                            'v == 2'
check "backlog drained"       'max(delivery_tasks_pending)'                            'v == 0'
check "dead-letter queue"     'max(delivery_dead_letter_queue)'                        'v == 0'
check "pickup p99"            'histogram_quantile(0.99, sum by (le) (rate(tally_pickup_latency_seconds_bucket[2m])))' 'v >= 0'
check "task duration p50"     'histogram_quantile(0.5, sum by (le) (rate(delivery_task_duration_seconds_bucket[2m])))' 'v > 0.01'
check "per-kind attempts"     'sum(tally_attempts_total{kind="simulate",outcome="delivered"})' 'v == 400'
check "invariant failures"    'sum(tally_invariant_checks_total{result="failed"})'      'v == 0'
check "invariant checks run"  'sum(tally_invariant_checks_total{result="passed"})'      'v >= 1'
check "order completion"      'sum(tally_order_completion_seconds_count)'              'v == 1'
check "orders completed"      'sum(tally_orders_finished_total{status="COMPLETED"})'   'v == 1'
check "API requests counted"  'sum(tally_http_requests_total{route="/api/orders",method="POST"})' 'v >= 1'

echo "promtool check metrics on each exposition:"
for port in $base $((base + 1)) $((base + 2)); do
  curl -sf "http://127.0.0.1:$port/metrics" >"$work/exposition.txt"
  if promtool check metrics <"$work/exposition.txt"; then
    echo "  ok    127.0.0.1:$port ($(grep -vc '^#' "$work/exposition.txt") samples)"
  else
    echo "  FAIL  127.0.0.1:$port"; fail=1
  fi
done
exit $fail
