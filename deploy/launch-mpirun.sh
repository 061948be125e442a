#!/usr/bin/env bash
# Launches kvshard on one node under MPI: rank 0 is the coordinator (HTTP API, batch jobs, metrics),
# ranks 1..N are the workers, one GPU each (a worker takes GPU local_rank - 1).
#
#   deploy/launch-mpirun.sh [--gpus N] [--config FILE] [--binary PATH] [COMMAND [FLAGS...]]
#
# Defaults: every GPU nvidia-smi lists (8 on an 8-GPU node: mpirun -np 9), deploy/kvshard.example.yaml,
# build/kvshard, and the command `serve`. Examples:
#   deploy/launch-mpirun.sh --config my.yaml serve --port 8000
#   deploy/launch-mpirun.sh --gpus 4 run-batch -i requests.jsonl -o results.jsonl
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"

gpus=""
config="$here/kvshard.example.yaml"
binary="$repo/build/kvshard"
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --gpus=*) gpus="${1#*=}"; shift ;;
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#*=}"; shift ;;
    --binary) binary="$2"; shift 2 ;;
    --binary=*) binary="${1#*=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
command="${1:-serve}"
[ $# -gt 0 ] && shift

if [ -z "$gpus" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
  else
    gpus=1  # the CPU backend: one worker
  fi
fi
if ! [[ "$gpus" =~ ^[0-9]+$ ]] || [ "$gpus" -lt 1 ]; then
  echo "launch-mpirun: --gpus must be a positive integer; got '$gpus'" >&2
  exit 2
fi
if [ ! -x "$binary" ]; then
  echo "launch-mpirun: $binary not found; build it with deploy/build.sh" >&2
  exit 2
fi
if [ ! -f "$config" ]; then
  echo "launch-mpirun: config file $config not found" >&2
  exit 2
fi

ranks=$((gpus + 1))
mpi_args=(-np "$ranks" --bind-to none --map-by slot)
# Open MPI refuses to run as root unless told; containers often run as root.
if [ "$(id -u)" -eq 0 ]; then mpi_args+=(--allow-run-as-root); fi

echo "launch-mpirun: $ranks ranks (1 coordinator + $gpus workers): $binary $command --config $config $*" >&2
exec mpirun "${mpi_args[@]}" "$binary" "$command" --config "$config" "$@"
