#!/usr/bin/env bash
# Fails when buf lint fails, when the contract breaks compatibility with the released v1 API
# (.ci/proto-baseline.json, a buf image), or when the committed generated code differs from a
# fresh generation.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=${PYTHON:-python}
buf=${BUF:-buf}
"$buf" lint
"$buf" breaking --against .ci/proto-baseline.json
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PYTHON="$py" scripts/gen_protos.sh "$tmp"
if ! diff -r -x __pycache__ "$tmp/cleanroom/v1" cleanroom/v1 >"$tmp/diff.txt"; then
  echo "generated code in cleanroom/v1 is stale: run 'make protos' and commit the result" >&2
  head -40 "$tmp/diff.txt" >&2
  exit 1
fi
echo "protos: buf lint clean, no breaking change against .ci/proto-baseline.json, generated code up to date"
