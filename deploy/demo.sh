#!/usr/bin/env bash
# The main job in one command: installs what kvshard needs, builds it, fetches the demo model and
# summarizes a long document (default: the GPL-3 text every Debian system has, about 8K tokens).
#   bash deploy/demo.sh [FILE] [extra kvshard flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
document="${1:-/usr/share/common-licenses/GPL-3}"
shift || true

bash deploy/install-deps.sh
model=$(bash deploy/fetch-demo-model.sh)
KVSHARD_BUILD_TARGET=kvshard bash deploy/build.sh build
exec ./build/kvshard summarize --model "$model" --input "$document" "$@"
