#!/usr/bin/env python3
"""Concurrent clients against a running `kvshard serve`: N requests at once to /v1/completions, each with
4,000 characters of a text file (client i takes them from character 3,000 i on) and 128 greedy tokens.
Prints the tokens generated, the wall time from the first request to the last reply, and tokens/s.

    python3 bench/serve_load.py --port 8000 --clients 32 --text FILE
"""
import argparse
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--text", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    text = open(args.text, encoding="utf-8", errors="replace").read()
    base = f"http://127.0.0.1:{args.port}"
    for _ in range(600):  # the server may still be loading the model
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        raise SystemExit(f"no server answered on {base}/health")

    def one(i):
        body = json.dumps({"prompt": text[i * 3000:i * 3000 + 4000], "max_tokens": args.max_tokens,
                           "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.load(reply)["usage"]["completion_tokens"]

    start = time.time()
    with ThreadPoolExecutor(args.clients) as pool:
        tokens = sum(pool.map(one, range(args.clients)))
    seconds = time.time() - start
    print(f"{args.clients} clients: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s")


if __name__ == "__main__":
    main()
