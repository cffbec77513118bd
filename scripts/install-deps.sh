#!/usr/bin/env bash
# Installs what cloudfunc needs on a Debian host (as root): the runtimes functions run in,
# libseccomp for the sandbox library, what libbpf (built into it for cgroup v2's device filter)
# is compiled with, the OCI runtimes the benchmarks compare against, wrk for
# the HTTP load benchmark, and Chart.js for the dashboard (served from disk, never fetched by
# the browser from elsewhere).
# With --test, also what only the tests use: headless Chromium and its WebDriver for the
# dashboard test, the Prometheus project's Python client, whose parser reads /metrics, an SMTP
# server for the email tests, PostgreSQL (the tests start clusters of their own, never the
# package's), and QEMU with two Debian kernels (downloaded and unpacked into
# a cache, not installed) for the pure cgroup v2 VM (scripts/v2vm.sh).
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(libseccomp-dev pkg-config make gcc libelf-dev zlib1g-dev python3 python3-venv nodejs runc crun runsc wrk ca-certificates curl libjs-chart.js)
if [ "${1:-}" = "--test" ]; then
  packages+=(chromium chromium-driver python3-prometheus-client python3-aiosmtpd postgresql qemu-system-x86)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cloudfunc needs a Rust toolchain (cargo) of 1.85 or newer on PATH" >&2
  exit 1
fi
if [ "${1:-}" = "--test" ]; then
  for kernel in stable newest; do
    bash "$(dirname "$0")/v2vm.sh" --kernel "$kernel" --prepare
  done
fi
if [ "${1:-}" = "--test" ] && ! cargo deny --version >/dev/null 2>&1; then
  # The dependency policy check (deny.toml); built from crates.io, a few minutes once.
  echo "installing cargo-deny"
  cargo install --locked --quiet cargo-deny@0.20.2
fi

