#!/usr/bin/env bash
# Quick start: installs what cloudfunc needs, builds it, installs `cloudfunc` and
# `cloudfunc-shim` into /usr/local/bin, and runs the platform with its embedded defaults:
# SQLite and code under /var/lib/cloudfunc, the API on http://127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --release --locked -p cloudfunc-server -p cloudfunc-sandbox --bins
install -m 0755 target/release/cloudfunc target/release/cloudfunc-shim /usr/local/bin/

cat <<'MSG'
cloudfunc is starting (Ctrl-C stops it). In another shell:
  cloudfunc deploy examples/hello_fn
  cloudfunc invoke hello_fn --data '{"name":"Alice"}'
  curl -H "Authorization: Bearer $(cloudfunc token)" http://127.0.0.1:8080/api/functions/
MSG
exec cloudfunc serve "$@"
