#!/usr/bin/env bash
# Check the Node.js example against Python's runner: build a tiny bundle on digits (make_fixture.py), then
# `node --test`. Skips with exit 0 where node (>= 20) or npm is missing. `make test` calls this.
#   PYTHON=...             the interpreter with edgetl installed (default: .venv/bin/python)
#   EDGETL_NODE_BUNDLE=... reuse an existing bundle instead of building one
set -euo pipefail
src="${BASH_SOURCE[0]}"
[[ "$src" == */* ]] || src="./$src"
here="$(cd "${src%/*}" && pwd)"
root="$(cd "$here/../.." && pwd)"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "deploy/node: node or npm not found; skipping the Node.js example test"
    exit 0
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "deploy/node: node $(node --version) is older than 20; skipping the Node.js example test"
    exit 0
fi

cd "$here"
# npm ci only when node_modules is missing or older than the lock file. --ignore-scripts: onnxruntime-node's
# postinstall would fetch CUDA libraries from outside npm on linux/x64; the CPU build is inside the npm package.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --ignore-scripts
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-$root/.venv/bin/python}" make_fixture.py "$tmp" ${EDGETL_NODE_BUNDLE:+--bundle "$EDGETL_NODE_BUNDLE"}
EDGETL_NODE_FIXTURE="$tmp/fixture.json" node --test test/
