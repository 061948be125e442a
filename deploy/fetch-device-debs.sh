#!/usr/bin/env bash
# Prepares the build dependencies a GPU host may lack, for hosts that cannot install packages: downloads
# the Debian 12 .debs on this (Debian 12) machine and unpacks them into the ignored folder .deps/ of the
# source tree. Copy the source tree with .deps/ to the GPU host and run deploy/device-check.sh there.
#
#   .deps/usr/       Abseil, prometheus-cpp, civetweb, nlohmann-json, unpacked (headers, CMake configs, .so)
#   .deps/icu-debs/  ICU 72 (.debs, kept packed: unpacked ICU data is ~80 MB); device-check.sh unpacks them
#                    only when the host has no ICU headers of its own
#   .deps/MANIFEST   package versions
#
# The GPU host is assumed to provide CUDA (nvcc, cuBLAS), a C++ compiler, CMake, Ninja, yaml-cpp,
# GoogleTest and Google Benchmark. Without OpenBLAS the build uses its portable CPU GEMM.
# Idempotent: run it again to refresh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"

unpacked_packages=(
  libabsl-dev libabsl20220623
  prometheus-cpp-dev libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libprometheus-cpp-push1.0
  libcivetweb-dev libcivetweb1 civetweb
  nlohmann-json3-dev
)
packed_packages=(libicu-dev libicu72)

rm -rf "$deps"
mkdir -p "$deps/icu-debs"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
apt-get download "${unpacked_packages[@]}" "${packed_packages[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
: >"$deps/MANIFEST"
for p in "${unpacked_packages[@]}"; do
  deb=$(ls "$work"/"${p}"_*.deb)
  dpkg -x "$deb" "$deps"
  echo "$(basename "$deb")" >>"$deps/MANIFEST"
done
for p in "${packed_packages[@]}"; do
  deb=$(ls "$work"/"${p}"_*.deb)
  cp "$deb" "$deps/icu-debs/"
  echo "$(basename "$deb") (packed)" >>"$deps/MANIFEST"
done

# Nothing a build needs: documentation, manual pages, static archives (we link the shared libraries).
rm -rf "$deps/usr/share/doc" "$deps/usr/share/man" "$deps/usr/share/lintian"
find "$deps/usr" -name '*.a' -delete

echo "fetch-device-debs: $(wc -l <"$deps/MANIFEST") packages in $deps ($(du -sh "$deps" | cut -f1))"
