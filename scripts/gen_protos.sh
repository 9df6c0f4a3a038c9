#!/usr/bin/env bash
# Regenerates the Python code for protos/ (messages, gRPC stubs and their type stubs).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root, i.e. cleanroom/v1/)
# The generator versions are pinned in pyproject.toml's dev extras, so the output is reproducible.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here}
py=${PYTHON:-python}
include=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
mkdir -p "$out/cleanroom/v1"
cd "$here"
"$py" -m grpc_tools.protoc -I protos -I "$include" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/cleanroom/v1/*.proto
# The generated package needs an __init__ so that setuptools finds it.
printf '"""Generated from protos/cleanroom/v1 by scripts/gen_protos.sh. Do not edit."""\n' >"$out/cleanroom/v1/__init__.py"
