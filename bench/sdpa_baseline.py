#!/usr/bin/env python3
"""Times torch.nn.functional.scaled_dot_product_attention (bf16) on the shapes of the kvshard attention
benchmarks, in the same run, and prints each kvshard figure beside it with the speedup.

  python3 bench/sdpa_baseline.py --decode-csv decode.csv --prefill-csv prefill.csv --out-dir DIR

Decode: the query group of each KV head is laid out as G query rows of that head, q [B, n_kv, G, d]
against k, v [B, n_kv, L, d]: the same bytes of KV as kvshard reads, and the fastest way SDPA runs GQA
decode (no K/V expansion). Prefill: q [1, H, n, d], k, v [1, n_kv, n, d], is_causal, enable_gqa.
Timing: CUDA events, median of --iters after --warmup; inputs under 512 MiB are replicated and rotated
so that L2 does not serve them.
"""
import argparse
import csv
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROTATE_BYTES = 512 << 20


def uniform(*shape, gen):
    return torch.empty(*shape, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1, generator=gen)


def median_ms(fn, warmup, iters):
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(warmup + i)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def decode_sdpa_mixed(row, lengths, warmup, iters):
    """A batch of different lengths: one SDPA call per request (no padding), timed together."""
    hq, hkv, d = (int(row[k]) for k in ("n_heads", "n_kv_heads", "head_dim"))
    g = hq // hkv
    gen = torch.Generator(device="cuda").manual_seed(0)
    qs = [uniform(1, hkv, g, d, gen=gen) for _ in lengths]
    ks = [uniform(1, hkv, L, d, gen=gen) for L in lengths]
    vs = [uniform(1, hkv, L, d, gen=gen) for L in lengths]

    def step(_):
        for q, k, v in zip(qs, ks, vs):
            F.scaled_dot_product_attention(q, k, v)

    ms = median_ms(step, warmup, iters)
    del qs, ks, vs
    torch.cuda.empty_cache()
    return ms, "one SDPA call per request"


def decode_sdpa(row, warmup, iters):
    b, hq, hkv, d, L = (int(row[k]) for k in ("batch", "n_heads", "n_kv_heads", "head_dim", "context"))
    if row["note"].startswith("mixed lengths"):
        lengths = []
        for token in row["note"][len("mixed lengths "):].split(";"):  # the CSV has ';' for ','
            if not token.strip().isdigit():
                break
            lengths.append(int(token))
        return decode_sdpa_mixed(row, lengths, warmup, iters)
    g = hq // hkv
    kv_bytes = 2 * b * hkv * L * d * 2
    copies = max(1, math.ceil(ROTATE_BYTES / kv_bytes))
    free, _ = torch.cuda.mem_get_info()
    if kv_bytes * copies + (2 << 30) > free:
        return None, f"skipped: needs {kv_bytes * copies / 1e9:.1f} GB"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = uniform(b, hkv, g, d, gen=gen)
    ks = [uniform(b, hkv, L, d, gen=gen) for _ in range(copies)]
    vs = [uniform(b, hkv, L, d, gen=gen) for _ in range(copies)]
    try:
        ms = median_ms(lambda i: F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies]), warmup, iters)
        note = ""
    except RuntimeError as e:  # out of memory or no kernel for the shape
        ms, note = None, f"error: {str(e).splitlines()[0][:80]}"
    del q, ks, vs
    torch.cuda.empty_cache()
    return ms, note


def prefill_sdpa(row, warmup, iters):
    hq, hkv, d, n = (int(row[k]) for k in ("n_heads", "n_kv_heads", "head_dim", "tokens"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = uniform(1, hq, n, d, gen=gen)
    k = uniform(1, hkv, n, d, gen=gen)
    v = uniform(1, hkv, n, d, gen=gen)
    note = "enable_gqa"
    try:
        ms = median_ms(lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), warmup, iters)
    except RuntimeError:
        # No GQA kernel for this shape: expand K/V outside the timed region.
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        note = "expanded K/V"
        ms = median_ms(lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup, iters)
    del q, k, v
    torch.cuda.empty_cache()
    return ms, note


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--decode-csv")
    parser.add_argument("--prefill-csv")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}")

    if args.decode_csv and os.path.exists(args.decode_csv):
        rows = list(csv.DictReader(open(args.decode_csv)))
        out_rows = []
        print(f"{'geometry':<10} {'context':>8} {'batch':>5} {'ours_ms':>10} {'%copy':>7} {'sdpa_ms':>10} "
              f"{'speedup':>8} {'#wrong':>6} note")
        for row in rows:
            ours = float(row["ms"]) if float(row["ms"]) > 0 else None
            sdpa, note = (None, "ours skipped") if ours is None else decode_sdpa(row, args.warmup, args.iters)
            speedup = sdpa / ours if (sdpa and ours) else None
            print(f"{row['geometry']:<10} {row['context']:>8} {row['batch']:>5} "
                  f"{(ours or 0):>10.4f} {100 * float(row['frac_copy']):>6.1f}% {(sdpa or 0):>10.4f} "
                  f"{(speedup or 0):>7.2f}x {wrong_column(row):>6} {note or row['note']}", flush=True)
            out_rows.append({**row, "sdpa_ms": sdpa or "", "speedup": speedup or "", "sdpa_note": note})
        write_csv(os.path.join(args.out_dir, "decode_vs_sdpa.csv"), out_rows)

    if args.prefill_csv and os.path.exists(args.prefill_csv):
        rows = list(csv.DictReader(open(args.prefill_csv)))
        out_rows = []
        print(f"{'geometry':<10} {'dtype':>5} {'kernel':>6} {'tokens':>7} {'ours_ms':>10} {'TFLOP/s':>8} {'%gemm':>7} "
              f"{'sdpa_ms':>10} {'speedup':>8} {'#wrong':>6} note")
        for row in rows:
            ours = float(row["ms"]) if float(row["ms"]) > 0 else None
            sdpa, note = prefill_sdpa(row, 2, 10)
            speedup = sdpa / ours if (sdpa and ours) else None
            print(f"{row['geometry']:<10} {row['dtype']:>5} {row.get('kernel', ''):>6} {row['tokens']:>7} {(ours or 0):>10.3f} "
                  f"{float(row['tflops']):>8.1f} {100 * float(row['frac_gemm']):>6.1f}% {(sdpa or 0):>10.3f} "
                  f"{(speedup or 0):>7.2f}x {wrong_column(row):>6} {note}", flush=True)
            out_rows.append({**row, "sdpa_ms": sdpa or "", "speedup": speedup or "", "sdpa_note": note})
        write_csv(os.path.join(args.out_dir, "prefill_vs_sdpa.csv"), out_rows)
    return 0


def wrong_column(row):
    """The benchmark's mismatch count, or '-' where it checked nothing (kvq_decode_bench: the kvq attention
    test checks that kernel against its CPU twin)."""
    return row["wrong"] if int(row.get("checked") or 0) > 0 else "-"


def write_csv(path, rows):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
