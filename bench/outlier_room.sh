#!/usr/bin/env bash
# Does the kvq key-outlier room of GPU workers hold real text? Cuts consecutive pieces of real text into
# prompts, and for each scheme and --kv_outlier_headroom value runs
#   mpirun -np 2 kvshard summarize --input PIECE --kv_scheme S --kv_outlier_headroom H --max_tokens 16
# (a coordinator and one GPU worker), then prints one line per run (pass, or the first error line) and a
# table of passes. Used for the RESULTS section "kvq key-outlier room ... on real text".
#
#   bench/outlier_room.sh --kvshard BIN --model M.gguf --calibration F.kvcal --text FILE:PIECES [--text ...]
#       [--chars 26000] [--schemes kvq3,kvq4] [--headrooms 3] [--out DIR]
set -uo pipefail

kvshard=""
model=""
calibration=""
texts=()
chars=26000
schemes=kvq3,kvq4
headrooms=3
out=./outlier-room-out
while [ $# -gt 0 ]; do
  case "$1" in
    --kvshard) kvshard="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --calibration) calibration="$2"; shift 2 ;;
    --text) texts+=("$2"); shift 2 ;;
    --chars) chars="$2"; shift 2 ;;
    --schemes) schemes="$2"; shift 2 ;;
    --headrooms) headrooms="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "outlier_room.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$kvshard" ] || [ -z "$model" ] || [ -z "$calibration" ] || [ ${#texts[@]} -eq 0 ]; then
  echo "outlier_room.sh: --kvshard, --model, --calibration and at least one --text FILE:PIECES are required" >&2
  exit 2
fi
mkdir -p "$out"
mpi=(mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none
     -x NCCL_NVLS_ENABLE=0 -x LD_LIBRARY_PATH -np 2)

prompts=()
for spec in "${texts[@]}"; do
  file="${spec%:*}"
  pieces="${spec##*:}"
  for ((i = 0; i < pieces; i++)); do
    p="$out/$(basename "$file").$i.txt"
    python3 - "$file" "$p" "$chars" "$i" <<'EOF'
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
n, i = int(sys.argv[3]), int(sys.argv[4])
open(sys.argv[2], "w", encoding="utf-8").write(text[i * n:(i + 1) * n])
EOF
    prompts+=("$p")
  done
done

declare -A passed total
for scheme in ${schemes//,/ }; do
  for h in ${headrooms//,/ }; do
    for p in "${prompts[@]}"; do
      log="$out/$(basename "$p").$scheme.h$h.log"
      "${mpi[@]}" "$kvshard" summarize --model "$model" --input "$p" --kv_scheme "$scheme" \
        --calibration "$calibration" --kv_outlier_headroom "$h" --max_tokens 16 --show_progress=false \
        > "$log" 2>&1
      rc=$?
      key="$(basename "${p%.*.txt}") $scheme $h"
      total[$key]=$(( ${total[$key]:-0} + 1 ))
      if [ $rc -eq 0 ]; then
        passed[$key]=$(( ${passed[$key]:-0} + 1 ))
        echo "pass  $scheme H=$h $(basename "$p")"
      else
        passed[$key]=$(( ${passed[$key]:-0} ))
        echo "FAIL  $scheme H=$h $(basename "$p") (exit $rc): $(grep -m1 -iE 'error|refused|outlier' "$log" | cut -c1-300)"
      fi
    done
  done
done
echo
echo "| text | scheme | headroom | passed |"
echo "|---|---|---|---|"
for key in "${!total[@]}"; do
  set -- $key
  echo "| $1 | $2 | $3 | ${passed[$key]} of ${total[$key]} |"
done | sort
