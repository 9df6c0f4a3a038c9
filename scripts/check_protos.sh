#!/usr/bin/env bash
# Fails when buf lint fails or when the committed generated code differs from a fresh generation.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=${PYTHON:-python}
buf=${BUF:-buf}
"$buf" lint
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PYTHON="$py" scripts/gen_protos.sh "$tmp"
if ! diff -r -x __pycache__ "$tmp/cleanroom/v1" cleanroom/v1 >"$tmp/diff.txt"; then
  echo "generated code in cleanroom/v1 is stale: run 'make protos' and commit the result" >&2
  head -40 "$tmp/diff.txt" >&2
  exit 1
fi
echo "protos: buf lint clean, generated code up to date"
