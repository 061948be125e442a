#!/usr/bin/env bash
# Builds and checks the CUDA backend on a GPU host in one go: configure, build the GPU tests and
# benchmarks, run the tests, run the benchmarks with the PyTorch SDPA baseline in the same run, and run
# compute-sanitizer memcheck over the kernel tests. Logs go to $OUT (default: ./device-check-out).
#
#   deploy/device-check.sh [phase ...]     phases: build test bench memcheck (default: all, in this order)
#
# Dependencies the host lacks come from .deps/ (deploy/fetch-device-debs.sh). Ends with a summary.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/device-check-out}"
mkdir -p "$out"
build="$root/build-device"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(build test bench memcheck)
want() { local p; for p in "${phases[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
summary=()
note() { summary+=("$*"); echo "== $*"; }
jobs=$(nproc)

prefix="$root/.deps/usr"
libdirs="$root/.deps/usr/lib/x86_64-linux-gnu"
if [ ! -f /usr/include/unicode/uchar.h ] && [ -d "$root/.deps/icu-debs" ]; then
  for deb in "$root"/.deps/icu-debs/*.deb; do dpkg -x "$deb" "$root/.deps/icu"; done
  prefix="$prefix;$root/.deps/icu/usr"
  libdirs="$libdirs:$root/.deps/icu/usr/lib/x86_64-linux-gnu"
  note "ICU: using the packed ICU 72 from .deps (no system ICU headers)"
fi
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  echo "# $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  cmake --version | head -n 1
  c++ --version | head -n 1
} | tee "$out/build.log"

if want build; then
  start=$(date +%s)
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVSHARD_ENABLE_CUDA=ON \
    -DCMAKE_PREFIX_PATH="$prefix" >>"$out/build.log" 2>&1
  targets=$(ninja -C "$build" -t targets all 2>/dev/null | grep -oE '^(gpu_[A-Za-z0-9_]+_test|[A-Za-z0-9_]+_bench):' | grep -v '^cmake_' |
            tr -d ':' | sort -u | tr '\n' ' ')
  if ninja -C "$build" -j "$jobs" $targets >>"$out/build.log" 2>&1; then
    note "build: ok ($(($(date +%s) - start)) s): $targets"
  else
    note "build: FAILED (see build.log)"
    grep -E "error|FAILED" "$out/build.log" | head -n 20
  fi
fi

gpu_tests=$(ls "$build"/tests/gpu_*_test 2>/dev/null)

if want test; then
  : >"$out/tests.log"
  for t in $gpu_tests; do
    if timeout 300 "$t" --gtest_color=no >>"$out/tests.log" 2>&1; then
      note "test $(basename "$t"): $(grep -E '^\[  PASSED  \]' "$out/tests.log" | tail -n 1)"
    else
      note "test $(basename "$t"): FAILED"
    fi
  done
  grep -E "^\[  FAILED  \]|#wrong|split\(s\)" "$out/tests.log" | head -n 40
fi

if want bench; then
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$out/bench.log" 2>&1 || true
  if [ -x "$build/bench/decode_attention_bench" ]; then
    timeout 300 "$build/bench/decode_attention_bench" --csv="$build/decode.csv" --split_sweep=16,33,66,99,128 2>&1 | tee -a "$out/bench.log"
  fi
  if [ -x "$build/bench/prefill_attention_bench" ]; then
    timeout 200 "$build/bench/prefill_attention_bench" --csv="$build/prefill.csv" 2>&1 | tee -a "$out/bench.log"
  fi
  PYTHONUNBUFFERED=1 timeout 300 python3 "$root/bench/sdpa_baseline.py" --decode-csv "$build/decode.csv" \
    --prefill-csv "$build/prefill.csv" --out-dir "$out" 2>&1 | tee -a "$out/bench.log"
  note "bench: see bench.log, decode_vs_sdpa.csv, prefill_vs_sdpa.csv"
fi

if want memcheck; then
  : >"$out/memcheck.log"
  for t in $gpu_tests; do
    timeout 240 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 3 "$t" --gtest_color=no \
      >>"$out/memcheck.log" 2>&1
    rc=$?
    note "memcheck $(basename "$t"): rc=$rc, $(grep -E 'ERROR SUMMARY' "$out/memcheck.log" | tail -n 1)"
  done
fi

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
