#!/usr/bin/env python3
"""The KV-cache quality table: perplexity of every KV scheme against fp16 on real text.

Runs `kvshard perplexity` for each text x context x scheme, keeps every result in a JSON file (so an
interrupted run resumes where it stopped), then writes the markdown table between the markers
<!-- kv-quality:begin --> and <!-- kv-quality:end --> of bench/RESULTS.md and a PNG plot of the
perplexity delta against measured bits per element.

Usage (from the repository root, after building and calibrating):
  bench/quality_table.py --kvshard build/kvshard --calibration kv.kvcal \\
      [--texts wiki.test.raw,austen_persuasion.txt] [--ctx 2048,8192] [--max-tokens 102400] \\
      [--schemes fp16,int8,...] [--variant 'kvq3 uniform=kvq3@uniform.kvcal'] [--device cpu|gpu] [--dry-run]

--device gpu scores every token as one decode step on the GPU (`kvshard perplexity --device gpu`), for
the schemes the GPU store holds (fp16, kvq2..4). Its results go to their own JSON file, markdown block
(<!-- kv-quality-gpu:begin --> .. end) and plot, because the GPU's bf16 dense layers shift every
perplexity slightly: deltas compare schemes within one device.

Each run's cost grows with its tokens; --dry-run prints the runs and an estimate from the tokens/s of
results already in the JSON file.
"""
import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_SCHEMES = "fp16,int8,int4,int3,kivi4,kivi2,kvq4,kvq3,kvq2,wkv4,deco"


def texts_dir_default(root):
    env = os.environ.get("KVSHARD_TEXTS")
    return env if env else os.path.join(root, "..", "shared", "data", "texts")


def parse_args():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kvshard", default=os.path.join(root, "build", "kvshard"))
    p.add_argument("--model", default="", help="model path (default: kvshard's default, the demo model)")
    p.add_argument("--calibration", required=True, help="calibration file for kvq and wkv")
    p.add_argument("--texts-dir", default=texts_dir_default(root))
    p.add_argument("--texts", default="wiki.test.raw,austen_persuasion.txt")
    p.add_argument("--ctx", default="2048,8192")
    p.add_argument("--max-tokens", type=int, default=102400, help="tokens of each text (whole windows)")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES)
    p.add_argument("--variant", action="append", default=[],
                   help="extra row 'LABEL=SPEC@CALIBRATION' (e.g. a scheme with another calibration)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--results", default="", help="default bench/quality_results[_gpu].json")
    p.add_argument("--markdown", default=os.path.join(root, "bench", "RESULTS.md"))
    p.add_argument("--plot", default="", help="default bench/quality_delta_vs_bits[_gpu].png")
    p.add_argument("--note", default="", help="a line written under the table (what was run, and why)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    suffix = "_gpu" if args.device == "gpu" else ""
    args.results = args.results or os.path.join(root, "bench", f"quality_results{suffix}.json")
    args.plot = args.plot or os.path.join(root, "bench", f"quality_delta_vs_bits{suffix}.png")
    args.marker = "kv-quality-gpu" if args.device == "gpu" else "kv-quality"
    return args


def run_key(text, ctx, label):
    return f"{text}|{ctx}|{label}"


def load_results(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save_results(path, results):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def planned_runs(args):
    rows = [(s, s, args.calibration) for s in args.schemes.split(",") if s]
    for v in args.variant:
        label, rest = v.split("=", 1)
        spec, calib = rest.split("@", 1) if "@" in rest else (rest, args.calibration)
        rows.append((label, spec, calib))
    runs = []
    for text in args.texts.split(","):
        for ctx in [int(c) for c in args.ctx.split(",")]:
            for label, spec, calib in rows:
                runs.append((text, ctx, label, spec, calib))
    return runs


def estimate(results, runs, max_tokens):
    rate = {}
    for r in results.values():
        rate.setdefault(r["ctx"], []).append(r["windows"] * r["ctx"] / max(r["seconds"], 1e-9))
    total = 0.0
    for text, ctx, label, spec, calib in runs:
        if run_key(text, ctx, label) in results:
            continue
        rates = rate.get(ctx) or [v for vs in rate.values() for v in vs]
        if not rates:
            return None
        total += (max_tokens // ctx) * ctx / (sum(rates) / len(rates))
    return total


def run_one(args, text, ctx, spec, calib):
    cmd = [args.kvshard, "perplexity", "--text", os.path.join(args.texts_dir, text), "--ctx", str(ctx),
           "--kv", spec, "--max_eval_tokens", str(args.max_tokens), "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    if calib:
        cmd += ["--calibration", calib]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=False)
    if out.returncode != 0:
        raise SystemExit(f"quality_table.py: kvshard perplexity failed for {spec} on {text} ctx {ctx}")
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    result["text"] = text  # the file's name, not where this machine keeps it
    return result


def markdown_table(args, results, runs):
    title = "## KV-cache quantization quality (SmolLM2-135M-Instruct Q4_1)"
    if args.device == "gpu":
        title = "## KV-cache quantization quality on the GPU, every token a decode step (SmolLM2-135M-Instruct Q4_1)"
    lines = [f"<!-- {args.marker}:begin -->", title, ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| text | ctx | scheme | perplexity | delta vs fp16 | bits/element (measured) | tokens scored |",
              "|---|---|---|---|---|---|---|"]
    for text in args.texts.split(","):
        for ctx in [int(c) for c in args.ctx.split(",")]:
            base = results.get(run_key(text, ctx, "fp16"))
            for t, c, label, spec, calib in runs:
                if t != text or c != ctx:
                    continue
                r = results.get(run_key(text, ctx, label))
                if r is None:
                    lines.append(f"| {text} | {ctx} | {label} | not run | | | |")
                    continue
                delta = f"{100.0 * (r['perplexity'] / base['perplexity'] - 1.0):+.2f}%" if base else "n/a"
                lines.append(f"| {text} | {ctx} | {label} | {r['perplexity']:.4f} | {delta} | "
                             f"{r['bits_per_element']:.3f} | {r['scored_tokens']} |")
    lines += ["", "Bits per element are measured on the store at the end of each window (codes, scales and "
              "zero points, outliers with their indices and counts, fp16 sink and residual), averaged over "
              "windows; calibration tables are per model and not counted.", f"<!-- {args.marker}:end -->"]
    return "\n".join(lines) + "\n"


def write_markdown(path, block, marker):
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block.rstrip("\n") + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "# Results\n\n") + block
    with open(path, "w") as f:
        f.write(text)


def plot(args, results, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>"
    for i, text in enumerate(args.texts.split(",")):
        for j, ctx in enumerate([int(c) for c in args.ctx.split(",")]):
            base = results.get(run_key(text, ctx, "fp16"))
            if not base:
                continue
            xs, ys, labels = [], [], []
            for t, c, label, spec, calib in runs:
                r = results.get(run_key(text, ctx, label))
                if t != text or c != ctx or r is None or label == "fp16":
                    continue
                xs.append(r["bits_per_element"])
                ys.append(100.0 * (r["perplexity"] / base["perplexity"] - 1.0))
                labels.append(label)
            ax.scatter(xs, ys, marker=markers[(2 * i + j) % len(markers)], label=f"{text} ctx {ctx}")
            for x, y, l in zip(xs, ys, labels):
                ax.annotate(l, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("measured bits per element (all-in)")
    ax.set_ylabel("perplexity delta vs fp16 (%)")
    ax.set_title("KV-cache schemes on SmolLM2-135M" + (" (GPU, decode steps)" if args.device == "gpu" else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


def main():
    args = parse_args()
    runs = planned_runs(args)
    results = load_results(args.results)
    todo = [r for r in runs if run_key(r[0], r[1], r[2]) not in results]
    eta = estimate(results, runs, args.max_tokens)
    print(f"quality_table.py: {len(runs)} runs, {len(todo)} to do"
          + (f", about {eta / 3600:.1f} h at the measured rates" if eta is not None else ""), file=sys.stderr)
    if args.dry_run:
        for r in todo:
            print("  " + " ".join(map(str, r[:4])), file=sys.stderr)
        return
    for text, ctx, label, spec, calib in todo:
        start = time.time()
        results[run_key(text, ctx, label)] = run_one(args, text, ctx, spec, calib)
        save_results(args.results, results)
        print(f"quality_table.py: {label} {text} ctx {ctx}: {time.time() - start:.0f} s", file=sys.stderr)
    write_markdown(args.markdown, markdown_table(args, results, runs), args.marker)
    try:
        plot(args, results, runs)
    except ImportError:
        print("quality_table.py: no matplotlib here, so no plot (the JSON keeps the results)", file=sys.stderr)
        return
    print(f"quality_table.py: wrote {args.markdown} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
