#!/usr/bin/env bash
# Quick start: installs everything, builds cloudfunc, installs it into /usr/local/bin and runs
# the seed's hello_fn in a sandbox with the platform's embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --release --locked -p cloudfunc-server -p cloudfunc-sandbox --bins
install -m 0755 target/release/cloudfunc target/release/cloudfunc-shim /usr/local/bin/

echo "== cloudfunc run examples/hello_fn (cold, then warm in the same sandbox)"
cloudfunc run examples/hello_fn --data '{"name":"Alice"}' --times 2
echo "== the same without a name"
cloudfunc run examples/hello_fn --data '{}'
