#!/usr/bin/env bash
# GPU time per kernel over N consecutive launches in the middle of a real prefill of the Llama-3-8B-shaped
# synthetic model on one GPU worker (mpirun: a coordinator and the worker, which runs under ncu).
#   bench/prefill_kernel_times.sh BUILD_DIR CALIBRATION [tokens=8192] [skip=4000] [count=300] [scheme=kvq3]
# CALIBRATION: `kvshard calibrate` of the same model on README.md (deploy/device-check.sh scale makes
# BUILD_DIR/synthetic-8b-text.kvcal). Needs ncu and, for NCCL, LD_LIBRARY_PATH as for the worker.
set -euo pipefail
build="$1" calibration="$2" tokens="${3:-8192}" skip="${4:-4000}" count="${5:-300}" scheme="${6:-kvq3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cat >"$out/rank.sh" <<EOS
#!/usr/bin/env bash
if [ "\$OMPI_COMM_WORLD_RANK" = 1 ]; then
  exec ncu --metrics gpu__time_duration.sum --launch-skip $skip -c $count --csv --log-file $out/ncu.csv "\$@"
fi
exec "\$@"
EOS
chmod +x "$out/rank.sh"
mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -x NCCL_NVLS_ENABLE=0 \
  -x LD_LIBRARY_PATH -np 2 --bind-to none "$out/rank.sh" "$build/kvshard" scale-bench --synthetic_model \
  --synthetic_layers 32 --synthetic_hidden 4096 --synthetic_heads 32 --synthetic_kv_heads 8 --synthetic_head_dim 128 \
  --synthetic_ffn 14336 --synthetic_vocab 128256 --synthetic_max_context 67108864 --kv_scheme "$scheme" --device gpu \
  --worker_kv_budget_mb 200000 --worker_threads 8 --max_batch 64 --calibration "$calibration" \
  --kv_outlier_headroom 10 --bench_text "$root/README.md" --bench_tokens_per_worker= --bench_prefill_tokens "$tokens" \
  >"$out/prefill.log" 2>&1
grep -E "^prefill workers" "$out/prefill.log"
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
for name, (us, n) in sorted(total.items(), key=lambda kv: -kv[1][0])[:25]:
    print(f"{100 * us / all_us:5.1f}% {us:9.1f} us {n:4d}x  {name}")
PY
