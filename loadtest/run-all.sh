#!/usr/bin/env bash
# Runs every loadtest scenario once, in one sequence on one machine, and gathers the
# Markdown reports into $OUT/all.md (the figures in loadtest/RESULTS.md come from this).
#   bash loadtest/run-all.sh [duration-sec]      (default 40; soak runs 4x as long)
#   SOAK_SEC=1800 bash loadtest/run-all.sh 40    (the 30-minute soak)
#   SCENARIOS="soak" SOAK_SEC=1800 bash loadtest/run-all.sh  (one scenario; all.md is appended to)
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-40}
OUT=${OUT:-loadtest/out}
cargo build --release --locked --workspace
mkdir -p "$OUT"
[ -n "${SCENARIOS:-}" ] || : >"$OUT/all.md"
status=0
for sc in ${SCENARIOS:-steady burst giant chaos-kill chaos-stop db-restart leader-kill net-cut soak}; do
  d=$dur
  [ "$sc" = soak ] && d=${SOAK_SEC:-$((dur * 4))}
  [ "$sc" = giant ] && d=$((dur * 3 / 4))
  echo "== $sc ($d s)" >&2
  if ! ./target/release/loadtest run "$sc" --duration-sec "$d" --out "$OUT" >"$OUT/$sc.stdout" 2>"$OUT/$sc.stderr"; then
    status=1
  fi
  cat "$OUT/$sc.stdout" >>"$OUT/all.md"
  echo >>"$OUT/all.md"
done
exit $status
