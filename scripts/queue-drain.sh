#!/usr/bin/env bash
# The queue's run rate on its own: a backlog of async tasks is built by a server with one
# queue worker (cloudfunc-load's async submissions), the server is stopped, and a server with
# WORKERS queue workers is started on the same data directory: the rate at which it drains
# the backlog (queue depth from the health route, more often as it nears empty) is the run rate, with no
# submissions competing for the CPU: backlog / time until it is empty (or what went in 30 s). Run as root after
# `cargo build --release -p cloudfunc-server -p cloudfunc-benches -p cloudfunc-sandbox`. DATABASE=<PostgreSQL URL>
# keeps the records there instead of in SQLite (the database is emptied first).
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
# The binaries that build the backlog (by default the same): one fixed builder gives two
# binaries compared side by side backlogs of the same size.
BUILD_BIN=${BUILD_BIN:-$BIN}
WORKERS=${WORKERS:-"4 16 64"}
SUBMIT_SECONDS=${SUBMIT_SECONDS:-20}
WORK=$(mktemp -d /var/tmp/cf-queue-drain.XXXXXX)
DB_FLAGS=()
if [ -n "${DATABASE:-}" ]; then
  DB_FLAGS=(--database "$DATABASE")
  PGOPTIONS=--client-min-messages=warning psql "$DATABASE" -qc 'DROP SCHEMA public CASCADE; CREATE SCHEMA public' >/dev/null
fi
PORT=18095
trap 'kill $(cat "$WORK/pid" 2>/dev/null) 2>/dev/null || true; sleep 1; rm -rf "$WORK"' EXIT

start() { # workers [binaries]
  "${2:-$BIN}/cloudfunc" --data-dir "$WORK/data" serve --listen "127.0.0.1:$PORT" --state-dir "$WORK/state" \
    --cgroup-parent cf-queue-drain --workers "$1" "${DB_FLAGS[@]}" >"$WORK/out" 2>>"$WORK/log" &
  echo $! >"$WORK/pid"
  for _ in $(seq 150); do curl -sf "127.0.0.1:$PORT/api/system/health" >/dev/null && return; sleep 0.2; done
  echo "the server did not start" >&2
  exit 1
}
stop() {
  kill -TERM "$(cat "$WORK/pid")"
  while kill -0 "$(cat "$WORK/pid")" 2>/dev/null; do sleep 0.2; done
}
depth() { curl -sf "127.0.0.1:$PORT/api/system/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["queue_depth"])'; }

# Besides the rate: how many task writes shared each of the recorder's commits (its group
# commits, from /metrics), and the share of the machine's CPU left idle during the drain (from
# /proc/stat): a drain with idle CPU is bound by how fast batches turn around, not by the CPU.
echo "| queue workers | backlog | run | seconds | tasks run/s | writes per commit | CPU idle % |"
echo "|---|---|---|---|---|---|---|"
for w in $WORKERS; do
  start 1 "$BUILD_BIN"
  T=$("$BUILD_BIN/cloudfunc" --data-dir "$WORK/data" --tenant bench token)
  "$BUILD_BIN/cloudfunc-load" --url "http://127.0.0.1:$PORT" --token "$T" --clients 16 --seconds "$SUBMIT_SECONDS" \
    --first-calls 0 --only async >/dev/null
  stop
  start "$w"
  ADMIN=$("$BIN/cloudfunc" --data-dir "$WORK/data" token --admin)
  # One poller for the whole drain: a shell loop forking curl and python3 (through pyenv's
  # shims) five times a second took 15-20 % of this 2-vCPU VM's CPU from the drain it timed.
  # Counting the queue costs the store time in proportion to its depth (12-15 ms for 60,000
  # queued on PostgreSQL), so the poller looks seldom while the queue is deep and often as
  # it nears empty: about a quarter of the time left at the rate so far, 0.05-1 s.
  read -r before ran secs rate per idle < <(python3 - "$PORT" "$ADMIN" <<'POLL'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/system/health"
depth = lambda: json.load(urllib.request.urlopen(url))["queue_depth"]
def commits():
    req = urllib.request.Request(url.replace("/api/system/health", "/metrics"),
                                 headers={"Authorization": f"Bearer {sys.argv[2]}"})
    text = urllib.request.urlopen(req).read().decode()
    value = lambda name: float(next(l for l in text.splitlines() if l.split("{")[0].split(" ")[0] == name).rsplit(" ", 1)[1])
    return value("cloudfunc_store_commits_total"), value("cloudfunc_store_writes_total")
def cpu():
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)
before = after = depth()
c0, w0 = commits()
i0, t0_cpu = cpu()
t0 = time.monotonic()
while after and time.monotonic() - t0 < 30:
    spent = time.monotonic() - t0
    rate = (before - after) / spent if before > after else 0
    time.sleep(min(1.0, max(0.05, after / rate / 4)) if rate else 0.25)
    after = depth()
d = time.monotonic() - t0
i1, t1_cpu = cpu()
c1, w1 = commits()
print(before, before - after, round(d, 1), round((before - after) / d),
      round((w1 - w0) / max(c1 - c0, 1), 1), round(100 * (i1 - i0) / max(t1_cpu - t0_cpu, 1)))
POLL
  )
  stop
  echo "| $w | $before | $ran | $secs | $rate | $per | $idle |"
  # Whatever is left is run out before the next round's backlog.
  start 16
  while [ "$(depth)" != 0 ]; do sleep 1; done
  stop
done
