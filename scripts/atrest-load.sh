#!/usr/bin/env bash
# What encryption at rest costs: warm sync calls/s and async tasks/s of two release servers
# side by side, one sealing every record (the default) and one with --no-encryption-at-rest,
# alternating rounds of cloudfunc-load against each. Run as root after
# `cargo build --release -p cloudfunc-server -p cloudfunc-benches`.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-15}
WORK=$(mktemp -d /var/tmp/cf-atrest-load.XXXXXX)
trap 'kill $(cat "$WORK"/*/pid 2>/dev/null) 2>/dev/null || true; sleep 1; rm -rf "$WORK"' EXIT

start() { # name port flags...
  local name=$1 port=$2
  shift 2
  mkdir -p "$WORK/$name"
  "$BIN/cloudfunc" --data-dir "$WORK/$name/data" serve --listen "127.0.0.1:$port" \
    --state-dir "$WORK/$name/state" --cgroup-parent "cf-atrest-load-$port" --workers 4 "$@" \
    >"$WORK/$name/out" 2>"$WORK/$name/log" &
  echo $! >"$WORK/$name/pid"
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/api/system/health" >/dev/null && return; sleep 0.2; done
  echo "server $name did not start" >&2
  exit 1
}
start sealed 18090
start plain 18091 --no-encryption-at-rest
T_SEALED=$("$BIN/cloudfunc" --data-dir "$WORK/sealed/data" --tenant bench token)
T_PLAIN=$("$BIN/cloudfunc" --data-dir "$WORK/plain/data" --tenant bench token)
echo "| round | server | sync calls/s (16 clients) | async tasks run/s |"
echo "|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for side in sealed plain; do
    if [ "$side" = sealed ]; then url=http://127.0.0.1:18090; t=$T_SEALED; else url=http://127.0.0.1:18091; t=$T_PLAIN; fi
    sync=$("$BIN/cloudfunc-load" --url "$url" --token "$t" --clients 16 --seconds "$SECONDS_EACH" --first-calls 0 --only sync \
      | awk -F'|' '/^\| sync/ {gsub(/ /, "", $5); print $5}')
    async=$("$BIN/cloudfunc-load" --url "$url" --token "$t" --clients 16 --seconds "$SECONDS_EACH" --first-calls 0 --only async \
      | awk -F'|' '/^\| queued tasks run/ {gsub(/ /, "", $5); print $5}')
    echo "| $round | $side | $sync | $async |"
  done
done
