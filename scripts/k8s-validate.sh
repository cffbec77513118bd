#!/usr/bin/env bash
# Validates deploy/kubernetes/ offline against the Kubernetes API schemas (kubernetes-validate
# from PyPI, strict: unknown fields are errors), after checking that a deliberately broken
# copy is refused. Custom resources (the ServiceMonitor) have no schema there and are only
# parsed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/k8s-venv
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubernetes-validate==1.37.0
fi
broken=$(mktemp --suffix .yaml)
trap 'rm -f "$broken"' EXIT
sed 's/terminationGracePeriodSeconds:/terminationGracePeriod:/' deploy/kubernetes/cloudfunc.yaml >"$broken"
if "$VENV/bin/kubernetes-validate" --strict --quiet "$broken" >/dev/null 2>&1; then
  echo "kubernetes-validate accepted a manifest with an unknown field: the check is not checking" >&2
  exit 1
fi
"$VENV/bin/kubernetes-validate" --strict deploy/kubernetes/*.yaml
echo "kubernetes manifests: valid"
