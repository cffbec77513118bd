#!/usr/bin/env bash
# Warm sync throughput of two release servers side by side, one without alert rules and one
# with 1,000 functions and 100 rules each watching all of them, alternating rounds of
# cloudfunc-load; then the second server's evaluation times. Run as root after
# `cargo build --release -p cloudfunc-server -p cloudfunc-benches`.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
ROUNDS=${ROUNDS:-3}
WORK=$(mktemp -d)
trap 'kill $(cat "$WORK"/*/pid 2>/dev/null) 2>/dev/null || true; sleep 1; rm -rf "$WORK"' EXIT

start() { # name port
  mkdir -p "$WORK/$1"
  CLOUDFUNC_LOG=info,cloudfunc_server::platform::alerts=debug "$BIN/cloudfunc" --log-format json \
    --data-dir "$WORK/$1/data" serve --listen "127.0.0.1:$2" --state-dir "$WORK/$1/state" --cgroup-parent "cf-alerts-load-$2" \
    >"$WORK/$1/out" 2>"$WORK/$1/log" &
  echo $! >"$WORK/$1/pid"
  for _ in $(seq 100); do curl -sf "127.0.0.1:$2/api/system/health" >/dev/null && return; sleep 0.2; done
  echo "server $1 did not start" >&2; exit 1
}
start plain 18080
start rules 18081
T_PLAIN=$("$BIN/cloudfunc" --data-dir "$WORK/plain/data" --tenant bench token)
T_RULES=$("$BIN/cloudfunc" --data-dir "$WORK/rules/data" --tenant bench token)
printf 'def handler(event):\n    return 1\n' >"$WORK/function.py"
(cd "$WORK" && python3 -c "import zipfile; z = zipfile.ZipFile('f.zip', 'w'); z.write('function.py'); z.close()")
for i in $(seq 1000); do
  curl -sf -o /dev/null -H "authorization: Bearer $T_RULES" -H 'content-type: application/zip' \
    --data-binary @"$WORK/f.zip" "127.0.0.1:18081/api/functions/deploy?name=f$i"
done
for i in $(seq 100); do
  curl -sf -o /dev/null -H "authorization: Bearer $T_RULES" -H 'content-type: application/json' \
    -d "{\"name\":\"r$i\",\"metric\":\"error_rate\",\"op\":\"above\",\"threshold\":0.$((i % 9 + 1))}" \
    127.0.0.1:18081/api/alerts/rules
done
echo "| round | server | calls/s |"
echo "|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for side in plain rules; do
    if [ "$side" = plain ]; then url=http://127.0.0.1:18080; t=$T_PLAIN; else url=http://127.0.0.1:18081; t=$T_RULES; fi
    rate=$("$BIN/cloudfunc-load" --url "$url" --token "$t" --clients 16 --seconds 20 --first-calls 0 --only sync \
      | awk -F'|' '/^\| sync/ {gsub(/ /, "", $5); print $5}')
    echo "| $round | $side | $rate |"
  done
done
echo
echo "evaluations of 100 rules over 1,000 functions (µs):"
grep -o '"elapsed_us":[0-9]*' "$WORK/rules/log" | cut -d: -f2 | tail -5 | paste -sd' '
