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

# The KV cache is kept in 3 bits (kvq3), on the GPU or the CPU, which needs the model's calibration: made
# once, from license texts every Debian system has (not the default document), and kept beside the model,
# where kvshard finds it.
if [ ! -f "$model.kvcal" ]; then
  echo "demo: calibrating the 3-bit KV cache for this model (once: seconds on a GPU, about a minute on a CPU; kept as $model.kvcal)" >&2
  calibration_text=$(mktemp)
  trap 'rm -f "$calibration_text"' EXIT
  cat /usr/share/common-licenses/{GPL-2,Apache-2.0,MPL-2.0,LGPL-2.1} > "$calibration_text"
  ./build/kvshard calibrate --model "$model" --text "$calibration_text" --calibration_tokens 4096
fi
./build/kvshard summarize --model "$model" --input "$document" "$@"
