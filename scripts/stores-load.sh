#!/usr/bin/env bash
# SQLite versus PostgreSQL as the store, side by side: warm sync calls/s and async submits/s
# of two release servers, one on the SQLite file (the default) and one on a PostgreSQL cluster
# this script makes (initdb in a temporary directory, durable defaults: fsync and synchronous
# commits on, reached over its Unix socket), alternating rounds of cloudfunc-load against
# each; then the queue's run rate on each (scripts/queue-drain.sh: a backlog drained by
# WORKERS workers with nothing submitting). Run as root after
# `cargo build --release -p cloudfunc-server -p cloudfunc-benches -p cloudfunc-sandbox`.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-15}
WORKERS=${WORKERS:-64}
PG=${PG:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
WORK=$(mktemp -d /var/tmp/cf-stores-load.XXXXXX)
chmod 755 "$WORK"
stop_pg() { runuser -u postgres -- "$PG/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null 2>&1 || true; }
trap 'kill $(cat "$WORK"/*/pid 2>/dev/null) 2>/dev/null || true; sleep 1; stop_pg; rm -rf "$WORK"' EXIT

mkdir -p "$WORK/pg"
chown postgres "$WORK/pg"
runuser -u postgres -- "$PG/initdb" -D "$WORK/pg/data" -U postgres --auth=trust --no-locale -E UTF8 >/dev/null
runuser -u postgres -- "$PG/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w start \
  -o "-k $WORK/pg -c listen_addresses='' -c max_connections=100" >/dev/null
runuser -u postgres -- "$PG/psql" -h "$WORK/pg" -U postgres -qc "CREATE DATABASE cloudfunc"
URL="host=$WORK/pg user=postgres dbname=cloudfunc"

start() { # name port flags...
  local name=$1 port=$2
  shift 2
  mkdir -p "$WORK/$name"
  "$BIN/cloudfunc" --data-dir "$WORK/$name/data" serve --listen "127.0.0.1:$port" \
    --state-dir "$WORK/$name/state" --cgroup-parent "cf-stores-load-$port" --workers "$WORKERS" "$@" \
    >"$WORK/$name/out" 2>"$WORK/$name/log" &
  echo $! >"$WORK/$name/pid"
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/api/system/health" >/dev/null && return; sleep 0.2; done
  echo "server $name did not start:" >&2
  tail -5 "$WORK/$name/log" >&2
  exit 1
}
start sqlite 18096
start postgres 18097 --database "$URL"
T_SQLITE=$("$BIN/cloudfunc" --data-dir "$WORK/sqlite/data" --tenant bench token)
T_PG=$("$BIN/cloudfunc" --data-dir "$WORK/postgres/data" --tenant bench token)
echo "| round | store | sync calls/s (16 clients) | async submits/s (16 clients, 202 once committed) |"
echo "|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for side in sqlite postgres; do
    if [ "$side" = sqlite ]; then url=http://127.0.0.1:18096; t=$T_SQLITE; else url=http://127.0.0.1:18097; t=$T_PG; fi
    sync=$("$BIN/cloudfunc-load" --url "$url" --token "$t" --clients 16 --seconds "$SECONDS_EACH" --first-calls 0 --only sync \
      | awk -F'|' '/^\| sync/ {gsub(/ /, "", $5); print $5}')
    async=$("$BIN/cloudfunc-load" --url "$url" --token "$t" --clients 16 --seconds "$SECONDS_EACH" --first-calls 0 --only async \
      | awk -F'|' '/^\| async submit/ {gsub(/ /, "", $5); print $5}')
    echo "| $round | $side | $sync | $async |"
  done
done
kill $(cat "$WORK"/*/pid) 2>/dev/null || true
sleep 2
runuser -u postgres -- "$PG/psql" -h "$WORK/pg" -U postgres -qc "CREATE DATABASE drain"
echo
echo "The queue's run rate, $WORKERS workers, nothing submitting:"
for side in sqlite postgres; do
  echo
  echo "$side:"
  if [ "$side" = sqlite ]; then
    WORKERS=$WORKERS SUBMIT_SECONDS=$SECONDS_EACH bash "$(dirname "$0")/queue-drain.sh"
  else
    DATABASE="host=$WORK/pg user=postgres dbname=drain" WORKERS=$WORKERS SUBMIT_SECONDS=$SECONDS_EACH \
      bash "$(dirname "$0")/queue-drain.sh"
  fi
done
