#!/usr/bin/env bash
# Configures and builds kvshard into build/ (or $1). CUDA is compiled whenever nvcc is found.
# Extra CMake arguments follow the build folder: deploy/build.sh build -DKVSHARD_QUICK_KERNELS=ON
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${1:-build}"
shift || true
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "$@"
elif [ $# -gt 0 ]; then
  cmake -S . -B "$build_dir" "$@"
fi
cmake --build "$build_dir" --parallel "$(nproc)" ${KVSHARD_BUILD_TARGET:+--target "$KVSHARD_BUILD_TARGET"}
