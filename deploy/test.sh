#!/usr/bin/env bash
# The whole test suite in one command: installs what it needs, builds everything (CUDA code too when
# nvcc is present), fetches the demo model and runs every test. GPU tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bash deploy/install-deps.sh
bash deploy/fetch-demo-model.sh >/dev/null
bash deploy/build.sh build

(cd build && ctest --output-on-failure --parallel "$(nproc)" --timeout 1200)

# The serving tests drive the real binary with the official OpenAI client and a real Prometheus.
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
KVSHARD_BINARY="$PWD/build/kvshard" .venv/bin/python -m pytest -q tests/serving
echo "deploy/test.sh: all tests passed in $(( $(date +%s) - start )) s"
