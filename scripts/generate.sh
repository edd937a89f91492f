#!/usr/bin/env bash
# Regenerates the Python code and type stubs for protos/ into respgw/ (committed).
# `scripts/generate.sh --check` fails when the committed code differs from what the protos give.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=respgw
# The protoc plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) live beside the interpreter.
export PATH="$("$PY" -c "import os, sys; print(os.path.dirname(sys.executable))"):$PATH"
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  out_root=$tmp
else
  out_root=.
fi
rm -rf "$out_root/$out"
mkdir -p "$out_root"
mapfile -t files < <(cd protos && find respgw -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$out_root" --mypy_out="$out_root" \
  --grpc_python_out="$out_root" --mypy_grpc_out="$out_root" "${files[@]/#/protos/}"
# Packages with markers, so the code imports as `from respgw.state.v1 import state_service_pb2`.
find "$out_root/$out" -type d -exec sh -c 'touch "$1/__init__.py"' _ {} \;
touch "$out_root/$out/py.typed"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r --exclude=__pycache__ "$out_root/$out" "$out"; then
    echo "generated code in $out/ is stale: run scripts/generate.sh and commit" >&2
    exit 1
  fi
  echo "generated code is up to date"
fi
