#!/usr/bin/env python3
"""Tables and plots of the scale runs (`kvshard scale-bench`, deploy/device-check.sh's scale phase).

Reads the JSON lines the runs append (one object per measurement), prints markdown tables of the decode
step (weak-scaling efficiency = the 1-worker step time over the N-worker step time at the same tokens per
worker and batch) and of the prefills, and draws the weak-scaling plot. The merge time is timed on worker
1 from the start of its merge to its end, so with several workers it includes waiting for the slowest
peer's attention; the step times show the merge's net cost.

Usage: bench/scale_plot.py RUN.jsonl [RUN.jsonl ...] [--png bench/scale_weak.png] [--title TEXT]
"""
import argparse
import json
import sys
from collections import defaultdict


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
    return rows


def decode_table(rows):
    decode = [r for r in rows if r["kind"] == "decode"]
    base = {}
    for r in decode:
        if r["workers"] == 1:
            base[(r["scheme"], r["tokens_per_worker"], r["batch"])] = r["step_ms_median"]
    out = ["| scheme | tokens/worker | batch | workers | context/request | step ms | tokens/s | weak-scaling eff. "
           "| merge µs/layer (with peer wait) | its share of the step | KV GB/worker | bits/elem |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(decode, key=lambda r: (r["scheme"], r["tokens_per_worker"], r["batch"], r["workers"])):
        key = (r["scheme"], r["tokens_per_worker"], r["batch"])
        eff = base[key] / r["step_ms_median"] if key in base and r["step_ms_median"] > 0 else None
        context = r["synthetic_fill_per_request"] + r["prompt_tokens"]
        share = r["merge_ms_per_step_median"] / r["step_ms_median"] if r["step_ms_median"] > 0 else 0
        out.append(
            f"| {r['scheme']} | {r['tokens_per_worker']:,} | {r['batch']} | {r['workers']} | {context:,} | "
            f"{r['step_ms_median']:.2f} | {r['batch'] * 1e3 / r['step_ms_median']:.1f} | "
            f"{'—' if eff is None else f'{eff:.2f}'} | "
            f"{r['merge_us_per_layer']:.1f} | {100 * share:.1f}% | {r['kv_bytes_per_worker_max'] / 1e9:.2f} | "
            f"{r['bits_per_element']:.2f} |")
    return "\n".join(out)


def prefill_table(rows):
    prefill = [r for r in rows if r["kind"] == "prefill"]
    out = ["| scheme | workers | prompt tokens | time to first token s | tokens/s | model TFLOP/s | GEMM TFLOP/s | MFU |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(prefill, key=lambda r: (r["scheme"], r["tokens"], r["workers"])):
        out.append(f"| {r['scheme']} | {r['workers']} | {r['tokens']:,} | {r['ttft_s']:.2f} | "
                   f"{r['tokens'] / r['ttft_s']:.0f} | {r['tflops']:.1f} | {r['gemm_tflops']:.0f} | "
                   f"{100 * r['mfu']:.1f}% |")
    return "\n".join(out)


def plot(rows, png, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = defaultdict(list)
    for r in rows:
        if r["kind"] == "decode":
            series[(r["scheme"], r["tokens_per_worker"], r["batch"])].append((r["workers"], r["step_ms_median"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (scheme, tokens, batch), points in sorted(series.items()):
        points.sort()
        label = f"{scheme}, {tokens / 2**20:g}M tokens/GPU, batch {batch}" if tokens >= 2**20 else \
            f"{scheme}, {tokens // 1024}K tokens/GPU, batch {batch}"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("GPUs (workers)")
    ax.set_ylabel("decode step, ms (median)")
    workers = sorted({r["workers"] for r in rows if r["kind"] == "decode"})
    ax.set_xticks(workers)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--png", default="")
    parser.add_argument("--title", default="Weak scaling of the decode step (flat is ideal)")
    args = parser.parse_args()
    rows = load(args.runs)
    if not rows:
        sys.exit("no measurements in " + ", ".join(args.runs))
    print(decode_table(rows))
    print()
    print(prefill_table(rows))
    if args.png:
        plot(rows, args.png, args.title)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
