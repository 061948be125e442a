#!/usr/bin/env bash
# Installs the Debian 12 packages kvshard builds and tests against. Idempotent and non-interactive:
# packages already present are left alone, so a second run costs one dpkg query.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates python3 python3-venv python3-pip
  libopenmpi-dev openmpi-bin
  libabsl-dev
  prometheus-cpp-dev
  libyaml-cpp-dev
  nlohmann-json3-dev
  libicu-dev
  libopenblas-openmp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libcivetweb-dev
  prometheus
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
