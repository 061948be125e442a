#!/usr/bin/env bash
# GPU time per kernel over N consecutive launches inside the worker's prefill chunks or decode steps of the
# Llama-3-8B-shaped synthetic model on one GPU worker (mpirun: a coordinator and the worker, which runs under
# ncu, profiling only the kernels inside the NVTX range "prefill chunk" or "decode step" that the worker opens;
# caches and clocks as in a plain run, so small kernels are not charged a cold L2 at base clock).
#   bench/kernel_times.sh prefill BUILD_DIR CALIBRATION [tokens=8192] [skip=4000] [count=300] [scheme=kvq3]
#   bench/kernel_times.sh decode  BUILD_DIR CALIBRATION [tokens=8192] [skip=4000] [count=2000] [scheme=kvq3] [batch=1]
# prefill: a real prompt of `tokens` (README.md's bytes); CALIBRATION from `kvshard calibrate` of the same model
# on README.md (deploy/device-check.sh scale makes BUILD_DIR/synthetic-8b-text.kvcal).
# decode: `batch` requests sharing `tokens` of synthetic fill, then greedy steps; CALIBRATION of the fill
# (BUILD_DIR/synthetic-8b-fill.kvcal). The fp16 scheme ignores CALIBRATION.
# Needs ncu and, for NCCL, LD_LIBRARY_PATH as for the worker.
set -euo pipefail
mode="$1" build="$2" calibration="$3" tokens="${4:-8192}" skip="${5:-4000}" scheme="${7:-kvq3}" batch="${8:-1}"
case "$mode" in
  prefill) range="prefill chunk" count="${6:-300}"
           run_flags=(--bench_text "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/README.md"
                      --bench_tokens_per_worker= --bench_prefill_tokens "$tokens" --kv_outlier_headroom 10) ;;
  decode)  range="decode step" count="${6:-2000}"
           run_flags=(--bench_tokens_per_worker "$tokens" --bench_batches "$batch" --bench_prefill_tokens=
                      --bench_decode_steps 32) ;;
  *) echo "usage: $0 prefill|decode BUILD_DIR CALIBRATION [tokens] [skip] [count] [scheme] [batch]" >&2; exit 2 ;;
esac
calibration_flags=()
[ "$scheme" != fp16 ] && calibration_flags=(--calibration "$calibration")
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cat >"$out/rank.sh" <<EOS
#!/usr/bin/env bash
if [ "\$OMPI_COMM_WORLD_RANK" = 1 ]; then
  exec ncu --nvtx --nvtx-include "$range/" --cache-control none --clock-control none \
    --metrics gpu__time_duration.sum --launch-skip $skip -c $count --csv \
    --log-file $out/ncu.csv "\$@"
fi
exec "\$@"
EOS
chmod +x "$out/rank.sh"
mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -x NCCL_NVLS_ENABLE=0 \
  -x LD_LIBRARY_PATH -np 2 --bind-to none "$out/rank.sh" "$build/kvshard" scale-bench --synthetic_model \
  --synthetic_layers 32 --synthetic_hidden 4096 --synthetic_heads 32 --synthetic_kv_heads 8 --synthetic_head_dim 128 \
  --synthetic_ffn 14336 --synthetic_vocab 128256 --synthetic_max_context 67108864 --kv_scheme "$scheme" --device gpu \
  --worker_kv_budget_mb 200000 --worker_threads 8 --max_batch 64 "${calibration_flags[@]}" "${run_flags[@]}" \
  >"$out/run.log" 2>&1
grep -E "^(prefill|decode) workers" "$out/run.log" || tail -n 5 "$out/run.log"
python3 - "$out/ncu.csv" <<'PY'
import collections, csv, re, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
total = collections.defaultdict(lambda: [0.0, 0])
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
for r in csv.DictReader(lines[start:]):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = re.sub(r"\(.*", "", r["Kernel Name"])[:90]
    total[name][0] += float(r["Metric Value"].replace(",", "")) * scale.get(r.get("Metric Unit", "ns"), 1.0)
    total[name][1] += 1
all_us = sum(t for t, _ in total.values())
print(f"{all_us:.0f} us in {sum(n for _, n in total.values())} launches")
for name, (us, n) in sorted(total.items(), key=lambda kv: -kv[1][0])[:30]:
    print(f"{100 * us / all_us:5.1f}% {us:9.1f} us {n:5d}x  {name}")
PY
