#!/usr/bin/env bash
# Fuzzes a real server against its own OpenAPI document with schemathesis: no 5xx, no response
# that breaks the schema, no undocumented status. Usage: scripts/schemathesis.sh [cloudfunc binary]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/cloudfunc}

venv=${CLOUDFUNC_ST_VENV:-target/schemathesis-venv}
if [ ! -x "$venv/bin/schemathesis" ]; then
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'schemathesis>=4,<5'
fi

dir=$(mktemp -d /tmp/cloudfunc-st-XXXXXX)
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$dir"
  for h in /sys/fs/cgroup/*/cloudfunc-st-$$; do rmdir "$h" 2>/dev/null || true; done
}
trap cleanup EXIT

"$bin" --data-dir "$dir/data" serve --listen 127.0.0.1:0 --state-dir "$dir/state" \
  --images-dir "$dir/images" --cgroup-parent "cloudfunc-st-$$" > "$dir/out" 2> "$dir/err" &
server=$!
for _ in $(seq 100); do grep -q listening "$dir/out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^cloudfunc listening on //p' "$dir/out")
[ -n "$url" ] || { cat "$dir/err"; echo "the server did not start" >&2; exit 1; }

token=$("$bin" --data-dir "$dir/data" --tenant st token)
export CLOUDFUNC_URL=$url CLOUDFUNC_DATA_DIR=$dir/data CLOUDFUNC_TENANT=st
"$bin" deploy examples/hello_fn > /dev/null

"$venv/bin/schemathesis" run "$url/api/openapi.json" \
  -H "Authorization: Bearer $token" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
  --max-examples "${CLOUDFUNC_ST_EXAMPLES:-25}" --request-timeout 60 --seed 1 --no-color
