"""A real Prometheus server scrapes kvshard's /metrics on loopback and answers queries about it."""

import shutil
import subprocess
import time

import pytest
import requests

from conftest import free_port


@pytest.fixture()
def prometheus(server, tmp_path):
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not shutil.which(binary):
        pytest.skip("prometheus not installed (Debian package `prometheus`; deploy/install-deps.sh)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: kvshard\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            pytest.fail("prometheus exited: " + process.stderr.read().decode(errors="replace"))
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("prometheus did not become ready in 60 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def query(url, expr):
    response = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_metrics_endpoint_text(server, client):
    client.completions.create(model=server.model, prompt="Hello", max_tokens=4, temperature=0)
    text = requests.get(server.metrics_url, timeout=10).text
    for name in ["kvshard_tokens_generated_total", "kvshard_tokens_prefilled_total", "kvshard_requests_running",
                 "kvshard_requests_waiting", "kvshard_time_to_first_token_seconds_bucket",
                 "kvshard_inter_token_latency_seconds_bucket", "kvshard_request_duration_seconds_bucket",
                 "kvshard_merge_seconds_bucket", "kvshard_prefill_tokens_per_second", "kvshard_requests_total",
                 'kvshard_decode_step_seconds_bucket{worker="0"', 'kvshard_kv_bytes_used{scheme="fp16",worker="0"}',
                 'kvshard_kv_bytes_capacity{scheme="fp16",worker="0"}',
                 'kvshard_kv_bits_per_element{scheme="fp16",worker="0"} 16']:
        assert name in text, name


def test_prometheus_scrapes_tokens_generated(server, client, prometheus):
    client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hello!"}],
                                   max_tokens=6, temperature=0)
    deadline = time.monotonic() + 90
    value = None
    while time.monotonic() < deadline:
        result = query(prometheus, "kvshard_tokens_generated_total")
        if result:
            value = float(result[0]["value"][1])
            if value > 0:
                break
        time.sleep(0.5)
    assert value is not None and value > 0, "Prometheus never saw kvshard_tokens_generated_total > 0"
    up = query(prometheus, 'up{job="kvshard"}')
    assert up and up[0]["value"][1] == "1"


def test_grafana_dashboard_queries_run(server, prometheus):
    """Every query of deploy/grafana-kvshard.json is valid PromQL against kvshard's metrics."""
    import json
    import pathlib
    dashboard = json.loads((pathlib.Path(__file__).resolve().parents[2] / "deploy" / "grafana-kvshard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(expressions) > 10
    for expr in expressions:
        concrete = expr.replace("$__rate_interval", "1m").replace("$worker", ".*")
        response = requests.get(f"{prometheus}/api/v1/query", params={"query": concrete}, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "success", (expr, response.text)
