#!/usr/bin/env python3
"""`mpirun -np 3 kvshard serve` with a tiny synthetic model: one completion over HTTP, the per-worker KV
metrics, then SIGTERM. Prints one JSON object with what it saw; exits non-zero when the server never
answered. Usage: serve_under_mpirun.py MPIRUN_COMMAND... (the kvshard command line without --port)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port, metrics_port = free_port(), free_port()
    command = sys.argv[1:] + ["--port", str(port), "--metrics_port", str(metrics_port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = {"completion": None, "metrics": [], "log": ""}
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 60
        model = None
        while time.time() < deadline and model is None:
            try:
                with urllib.request.urlopen(base + "/models", timeout=5) as r:
                    model = json.load(r)["data"][0]["id"]
            except OSError:
                time.sleep(0.5)
        if model is None:
            raise SystemExit("the server never answered")
        body = json.dumps({"model": model, "prompt": "hello world", "max_tokens": 5}).encode()
        request = urllib.request.Request(base + "/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            seen["completion"] = json.load(r)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        seen["metrics"] = [l for l in text.splitlines() if l.startswith("kvshard_kv_bytes_capacity")]
        # Workers whose decode step time was observed, and how many cross-worker merges were.
        seen["decode_step_workers"] = sorted(set(re.findall(
            r'^kvshard_decode_step_seconds_count\{worker="(\d+)"\} [1-9]', text, re.M)))
        merges = re.search(r"^kvshard_merge_seconds_count (\S+)", text, re.M)
        seen["merges"] = int(float(merges.group(1))) if merges else 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            seen["log"] = server.communicate(timeout=30)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            seen["log"] = "did not stop within 30 s of SIGTERM"
        seen["exit_code"] = server.returncode
        print(json.dumps(seen))


if __name__ == "__main__":
    main()
