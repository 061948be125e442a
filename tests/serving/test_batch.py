"""`kvshard run-batch` with the demo model: error records, and a run killed with SIGKILL then resumed."""

import collections
import json
import signal
import subprocess
import time


def request_line(custom_id, max_tokens=2, url="/v1/chat/completions"):
    body = {"max_tokens": max_tokens, "temperature": 0}
    if url == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": f"Say hello to {custom_id}."}]
    else:
        body["prompt"] = f"Hello, {custom_id}"
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run_batch(binary, model, inp, out, timeout=600):
    return subprocess.run([str(binary), "run-batch", f"--model={model}", "-i", str(inp), "-o", str(out)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def records(path):
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_twenty_requests_with_two_malformed_lines(kvshard_binary, model_path, tmp_path):
    lines = []
    for i in range(20):
        if i == 6:
            lines.append('{"custom_id": "req-6", "method": "POST", "url": "/v1/chat/completions", "body": {')
        elif i == 15:
            lines.append("not json at all")
        else:
            lines.append(request_line(f"req-{i}", url="/v1/completions" if i % 4 == 0 else "/v1/chat/completions"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    result = run_batch(kvshard_binary, model_path, inp, out)
    assert result.returncode == 0, result.stderr
    assert "run-batch" in result.stderr  # the progress line

    answered = records(out)
    assert len(answered) == 20
    results = [r for r in answered if r["error"] is None]
    errors = [r for r in answered if r["error"] is not None]
    assert len(results) == 18 and len(errors) == 2
    for r in results:
        assert r["id"].startswith("batch_req_")
        assert r["response"]["status_code"] == 200, r
        body = r["response"]["body"]
        assert body["object"] in ("chat.completion", "text_completion")
        assert body["usage"]["completion_tokens"] > 0
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(20) if i not in (6, 15))
    assert sorted(e["error"]["line"] for e in errors) == [7, 16]
    for e in errors:
        assert e["response"] is None
        assert e["custom_id"] is None
        assert e["error"]["code"] and e["error"]["message"]

    # Rerunning finds everything answered.
    before = out.read_text()
    result = run_batch(kvshard_binary, model_path, inp, out)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == before


def test_sigkill_mid_run_then_resume_gives_one_line_per_custom_id(kvshard_binary, model_path, tmp_path):
    ids = [f"doc-{i:02d}" for i in range(10)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(request_line(i, max_tokens=8) + "\n" for i in ids))

    process = subprocess.Popen(
        [str(kvshard_binary), "run-batch", f"--model={model_path}", "-i", str(inp), "-o", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    killed_mid_run = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert killed_mid_run, "the batch finished before it could be killed; make it longer"
    done_before = out.read_text().count("\n")
    assert 2 <= done_before < len(ids)

    # A crash in the middle of a write would leave an unterminated last line; simulate one too.
    with open(out, "a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "doc-99", "respo')

    result = run_batch(kvshard_binary, model_path, inp, out)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.endswith("\n")
    answered = records(out)
    counts = collections.Counter(r["custom_id"] for r in answered)
    assert counts == collections.Counter(ids), counts
    assert all(r["response"]["status_code"] == 200 for r in answered)
