#!/usr/bin/env bash
# Builds and checks the CUDA backend on a GPU host in one go: configure, build the GPU tests, the
# benchmarks and the kvshard binary, run the tests, run the benchmarks with the PyTorch SDPA baseline in
# the same run, and run compute-sanitizer memcheck over the kernel tests. With a model, the e2e phase
# also compares GPU and CPU greedy decoding (the GPU model test, and `kvshard summarize` on both devices).
# Logs go to $OUT (default: ./device-check-out).
#
#   deploy/device-check.sh [--build-dir DIR] [--quick] [--model FILE.gguf] [--document FILE] [phase ...]
#   phases: build test bench memcheck e2e nccl workers (default: build test bench memcheck, plus e2e when --model
#   is given). --quick configures with KVSHARD_QUICK_KERNELS=ON.
#   nccl: on a host with 2+ GPUs, builds only the NCCL data plane's test and benchmark and runs both under
#   mpirun with a coordinator and one worker per GPU (at most --workers N), NVLink multicast off
#   (NCCL_NVLS_ENABLE=0); logs nccl_test.log and nccl_bench.log.
#   workers: the same for the GPU workers' test (tests/mpi/gpu_workers_test.cc); logs gpu_workers_test.log.
#   scale: the scale runs of a Llama-3-8B-shaped synthetic model (`kvshard scale-bench`): a same-run cuBLAS
#   GEMM rate, a calibration of the synthetic fill, then for 1 worker and for one worker per GPU the
#   decode step at --scale-tokens tokens per worker and --scale-batches, and the real prefill of
#   --scale-prefill prompts (--scale-scheme, --scale-workers "1 2" choose the rest; an empty size list
#   skips that part; --scale-flags "..." adds kvshard flags to every run, e.g. "--cuda_graph_rows 0").
#   Logs scale.log, scale.jsonl (bench/scale_plot.py draws them). The calibrations (35-55 s each, mostly
#   making the model's weights on the host) are kept in --scale-calibrations DIR (default the build
#   directory) and reused from there when present; a file that does not match the model is refused by
#   kvshard, so a stale one fails loudly.
#
# Dependencies the host lacks come from .deps/ (deploy/fetch-device-debs.sh); the build directory keeps a
# copy, so later runs against the same build need no .deps/. Ends with a summary.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/device-check-out}"
mkdir -p "$out"
build="$root/build-device"
model=""
document=""
quick=OFF
max_workers=8
scale_scheme=kvq3
scale_tokens=262144,2097152
scale_batches=1,16
scale_prefill=32768,131072
scale_worker_counts=""
scale_calibrations=""
scale_flags=""
phases=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --document) document="$2"; shift 2 ;;
    --quick) quick=ON; shift ;;
    --workers) max_workers="$2"; shift 2 ;;
    --scale-scheme) scale_scheme="$2"; shift 2 ;;
    --scale-tokens) scale_tokens="$2"; shift 2 ;;
    --scale-batches) scale_batches="$2"; shift 2 ;;
    --scale-prefill) scale_prefill="$2"; shift 2 ;;
    --scale-workers) scale_worker_counts="$2"; shift 2 ;;
    --scale-calibrations) scale_calibrations="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --scale-flags) scale_flags="$2"; shift 2 ;;
    *) phases+=("$1"); shift ;;
  esac
done
if [ ${#phases[@]} -eq 0 ]; then
  phases=(build test bench memcheck)
  [ -n "$model" ] && phases+=(e2e)
fi
want() { local p; for p in "${phases[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
summary=()
note() { summary+=("$*"); echo "== $*"; }
jobs=$(nproc)

# The build directory keeps its own copy of .deps/, which CMake's cache then points at, so a later run
# (or a run without .deps/) can reconfigure and run the binaries.
if [ -d "$root/.deps" ] && { want build || want nccl || want workers || want scale; }; then
  mkdir -p "$build"
  rm -rf "$build/deps" && cp -a "$root/.deps" "$build/deps"
fi
deps="$build/deps"
prefix="$deps/usr"
libdirs="$deps/usr/lib/x86_64-linux-gnu"
if [ ! -f /usr/include/unicode/uchar.h ] && [ -d "$deps/icu-debs" ]; then
  for deb in "$deps"/icu-debs/*.deb; do dpkg -x "$deb" "$deps/icu"; done
  prefix="$prefix;$deps/icu/usr"
  libdirs="$libdirs:$deps/icu/usr/lib/x86_64-linux-gnu"
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

# NCCL: the CUDA toolkit's, else the one PyTorch's wheels bring (nvidia-nccl-*, no libnccl.so link).
nccl_args=()
if ! ls "$(dirname "$(command -v nvcc)")"/../lib*/libnccl.so >/dev/null 2>&1; then
  wheel=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null ||
          python3 -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null)
  if [ -n "$wheel" ] && [ -f "$wheel/include/nccl.h" ]; then
    lib=$(ls "$wheel"/lib/libnccl.so* | head -n 1)
    nccl_args=(-DKVSHARD_NCCL_LIB="$lib" -DKVSHARD_NCCL_INCLUDE="$wheel/include")
    export LD_LIBRARY_PATH="$wheel/lib:$LD_LIBRARY_PATH"
    note "NCCL: from the Python wheel ($lib)"
  fi
fi
configure() {
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVSHARD_ENABLE_CUDA=ON \
    -DKVSHARD_QUICK_KERNELS=$quick -DCMAKE_PREFIX_PATH="$prefix" "${nccl_args[@]}" >>"$out/build.log" 2>&1
}

if want build; then
  start=$(date +%s)
  configure
  targets=$(ninja -C "$build" -t targets all 2>/dev/null | grep -oE '^(gpu_[A-Za-z0-9_]+_test|[A-Za-z0-9_]+_bench):' | grep -v '^cmake_' |
            tr -d ':' | sort -u | tr '\n' ' ')
  if ninja -C "$build" -j "$jobs" $targets kvshard >>"$out/build.log" 2>&1; then
    note "build: ok ($(($(date +%s) - start)) s): $targets kvshard"
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
    timeout 300 "$build/bench/decode_attention_bench" --csv="$build/decode.csv" --split_sweep=8,16,32,64,128 2>&1 |
      tee -a "$out/bench.log"
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

if want e2e; then
  : >"$out/e2e.log"
  if [ -z "$model" ] || [ ! -f "$model" ]; then
    note "e2e: no model (--model FILE.gguf)"
  else
    KVSHARD_MODEL="$model" timeout 300 "$build/tests/gpu_gpu_model_test" --gtest_color=no >>"$out/e2e.log" 2>&1
    note "e2e gpu_gpu_model_test: rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]' "$out/e2e.log" | tail -n 1)"
    grep -E "divergence|greedy:|refusal" "$out/e2e.log"
    if [ -z "$document" ]; then
      document="$out/document.txt"
      # About 6K tokens: within the demo model's 8K context, with room for the summary.
      for i in $(seq 40); do cat "$root/README.md" 2>/dev/null || echo "A short paragraph of text."; done |
        head -c 20000 >"$document"
    fi
    # Token for token only in fp16: under kvq3 a last-bit difference of a K/V value (bf16 GEMMs on the GPU,
    # another BLAS on another CPU) can move it across a 3-bit code boundary, and the two runs then decode
    # as two draws of kvq3's noise (tests/gpu/gpu_model_test.cc bounds that on the logits). The GPU
    # prefills in the CPU's 512-token chunks.
    summaries_ok=yes
    for device in cpu gpu; do
      timeout 300 "$build/kvshard" summarize --model "$model" --input "$document" --max_tokens 64 --device=$device \
        --gpu_prefill_chunk 512 --kv_scheme fp16 \
        >"$out/summary-$device.txt" 2>>"$out/e2e.log"
      rc=$?
      [ $rc -eq 0 ] && [ -s "$out/summary-$device.txt" ] || summaries_ok=no
      note "e2e summarize --device=$device --kv_scheme fp16: rc=$rc $(grep -E '^kvshard' "$out/e2e.log" | tail -n 1)"
    done
    if [ $summaries_ok = no ]; then
      note "e2e: a summary failed or is empty (see e2e.log)"
    elif cmp -s "$out/summary-cpu.txt" "$out/summary-gpu.txt"; then
      note "e2e: kvshard summarize prints the same greedy summary on GPU and CPU (at most 64 tokens)"
    else
      note "e2e: the GPU and CPU summaries differ (see summary-cpu.txt, summary-gpu.txt)"
    fi
    head -c 600 "$out/summary-gpu.txt"; echo
    # The demo's own settings on the GPU: kvq3 when a calibration sits beside the model.
    timeout 120 "$build/kvshard" summarize --model "$model" --input "$document" --max_tokens 64 --device=gpu \
      >"$out/summary-gpu-auto.txt" 2>>"$out/e2e.log"
    note "e2e summarize --device=gpu: rc=$? $(grep -E '^kvshard' "$out/e2e.log" | tail -n 1)"
    head -c 600 "$out/summary-gpu-auto.txt"; echo
  fi
fi

# Configures and builds the targets of one phase, noting the result.
build_phase() {
  local phase="$1" start
  shift
  start=$(date +%s)
  configure
  if ninja -C "$build" -j "$jobs" "$@" >>"$out/build.log" 2>&1; then
    note "$phase build: ok ($(($(date +%s) - start)) s)"
  else
    note "$phase build: FAILED (see build.log)"
    grep -E "error|FAILED" "$out/build.log" | head -n 20
  fi
}

# mpirun flags for a coordinator and one worker per GPU (at most --workers), NVLink multicast off.
mpirun_one_worker_per_gpu() {
  local gpus
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  workers=$((gpus < max_workers ? gpus : max_workers))
  export NCCL_NVLS_ENABLE=0
  mpirun_flags=(--allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none
                -x NCCL_NVLS_ENABLE=0 -x LD_LIBRARY_PATH -np $((workers + 1)))
}

# Runs a GoogleTest program under mpirun_flags into $out/LOG and notes its last verdict.
mpirun_test() {
  local label="$1" program="$2" log="$3"
  timeout 240 mpirun "${mpirun_flags[@]}" "$program" --gtest_color=no >"$out/$log" 2>&1
  note "$label, $workers workers: rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]|SKIPPED' "$out/$log" | tail -n 1)"
}

if want nccl; then
  build_phase nccl nccl_workers_test nccl_merge_bench
  mpirun_one_worker_per_gpu
  mpirun_test "nccl test" "$build/tests/mpi/nccl_workers_test" nccl_test.log
  grep -E "^\[  FAILED  \]|gpu merge|missing peer" "$out/nccl_test.log" | head -n 40
  timeout 200 mpirun "${mpirun_flags[@]}" "$build/bench/nccl_merge_bench" >"$out/nccl_bench.log" 2>&1
  note "nccl bench: rc=$?"
  cat "$out/nccl_bench.log"
fi

if want workers; then
  build_phase workers gpu_workers_test
  mpirun_one_worker_per_gpu
  mpirun_test "GPU workers test" "$build/tests/mpi/gpu_workers_test" gpu_workers_test.log
  grep -E "^\[  FAILED  \]|relative L2|Failure|error" "$out/gpu_workers_test.log" | head -n 40
fi

if want scale; then
  build_phase scale kvshard prefill_attention_bench
  mpirun_one_worker_per_gpu
  gemm=$("$build/bench/prefill_attention_bench" --tokens= 2>&1 | sed -n 's/.*GEMM.*: \([0-9.]*\) TFLOP\/s.*/\1/p')
  note "scale: cuBLAS bf16 GEMM ${gemm:-?} TFLOP/s (same run, GPU 0)"
  model_flags=(--synthetic_model --synthetic_layers 32 --synthetic_hidden 4096 --synthetic_heads 32
               --synthetic_kv_heads 8 --synthetic_head_dim 128 --synthetic_ffn 14336 --synthetic_vocab 128256
               --synthetic_max_context 67108864)
  label="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
  # Calibrates for the scheme: on the synthetic fill (decode contexts), or on this repository's README
  # through the model (real prefill of that text, whose keys the fill's thresholds do not fit).
  calibrate() {
    local file="$1" start
    shift
    if [ -s "$file" ]; then
      note "scale: calibration $(basename "$file"): reused"
      return
    fi
    start=$(date +%s)
    "$build/kvshard" calibrate "${model_flags[@]}" --outlier_fractions 0.01 --out "$file" "$@" >>"$out/scale.log" 2>&1
    note "scale: calibration $(basename "$file"): rc=$? ($(($(date +%s) - start)) s)"
  }
  # scale-bench with n workers; the remaining arguments are its flags.
  scale_bench() {
    local n="$1" what="$2" start
    shift 2
    start=$(date +%s)
    # --bind-to none: each worker makes 8B synthetic weights on the host with all its threads.
    timeout 420 mpirun "${mpirun_flags[@]:0:${#mpirun_flags[@]}-2}" -np $((n + 1)) --bind-to none \
      "$build/kvshard" scale-bench "${model_flags[@]}" --kv_scheme "$scale_scheme" --device gpu \
      --worker_kv_budget_mb 200000 --worker_threads 8 --max_batch 64 --bench_gemm_tflops "${gemm:-0}" \
      --bench_json "$out/scale.jsonl" --bench_label "$label" $scale_flags "$@" >>"$out/scale.log" 2>&1
    note "scale: $what, $n worker(s): rc=$? ($(($(date +%s) - start)) s)"
  }
  fill_calibration=() text_calibration=()
  calibrations="${scale_calibrations:-$build}"
  if [ "$scale_scheme" != fp16 ]; then
    [ -n "$scale_tokens" ] && calibrate "$calibrations/synthetic-8b-fill.kvcal" --calibration_tokens 4096
    [ -n "$scale_prefill" ] &&
      calibrate "$calibrations/synthetic-8b-text.kvcal" --text "$root/README.md" --calibration_tokens 512 --ctx 256
    fill_calibration=(--calibration "$calibrations/synthetic-8b-fill.kvcal")
    text_calibration=(--calibration "$calibrations/synthetic-8b-text.kvcal")
  fi
  : >"$out/scale.jsonl"
  for n in ${scale_worker_counts:-1 $workers}; do
    if [ -n "$scale_tokens" ]; then
      scale_bench "$n" decode "${fill_calibration[@]}" --bench_tokens_per_worker "$scale_tokens" \
        --bench_batches "$scale_batches" --bench_prefill_tokens=
    fi
    if [ -n "$scale_prefill" ]; then
      # The prompt is README.md's bytes, repeated: the text the calibration saw. This random-weight model's
      # keys over a long prompt leave more than 3x the calibrated 1% outside thresholds from 256-token
      # windows, so the store gets room for 10x (the default 3x refuses the request).
      scale_bench "$n" prefill "${text_calibration[@]}" --bench_text "$root/README.md" --bench_tokens_per_worker= \
        --bench_prefill_tokens "$scale_prefill" --kv_outlier_headroom 10
    fi
  done
  grep -E "^(decode|prefill|#)|rror|refused" "$out/scale.log" | head -n 60
fi

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
