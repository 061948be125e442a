"""Fixtures for the serving tests: the kvshard binary, the demo model, and a running `kvshard serve`.

The binary is $KVSHARD_BINARY or build/kvshard; the model is $KVSHARD_MODEL or the demo model's cache
(deploy/fetch-demo-model.sh). Everything listens on 127.0.0.1 only, on ports the kernel picks.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

REPO = pathlib.Path(__file__).resolve().parents[2]
API_KEY = "kvshard-test-key"
MAX_BODY_BYTES = 256 * 1024
STARTUP_SECONDS = 300


def _binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("KVSHARD_BINARY", REPO / "build" / "kvshard"))
    if not path.is_file():
        pytest.skip(f"kvshard binary not found at {path}: build it (deploy/build.sh) or set KVSHARD_BINARY")
    return path


def _model() -> pathlib.Path:
    if os.environ.get("KVSHARD_MODEL"):
        path = pathlib.Path(os.environ["KVSHARD_MODEL"])
    else:
        cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
        path = cache / "kvshard" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"demo model not found at {path}: run deploy/fetch-demo-model.sh or set KVSHARD_MODEL")
    return path


@pytest.fixture(scope="session")
def kvshard_binary() -> pathlib.Path:
    return _binary()


@pytest.fixture(scope="session")
def model_path() -> pathlib.Path:
    return _model()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `kvshard serve` process; its stderr is collected by a thread."""

    def __init__(self, binary, model, tmp_dir, extra_args=()):
        key_file = tmp_dir / "api_key"
        key_file.write_text(API_KEY + "\n")
        self.lines = []
        self.process = subprocess.Popen(
            # fp16 KV, whose metrics the tests check (auto would take kvq3 when a calibration sits beside
            # the model)
            [str(binary), "serve", f"--model={model}", "--kv_scheme=fp16", "--host=127.0.0.1", "--port=0",
             "--metrics_host=127.0.0.1", "--metrics_port=0", f"--api_key_file={key_file}",
             f"--max_body_bytes={MAX_BODY_BYTES}", "--max_queue=64", "--default_max_tokens=16",
             *extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.port = self._wait_for(r"listening on http://127\.0\.0\.1:(\d+)/v1")
        self.metrics_port = self._wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        health = requests.get(f"http://127.0.0.1:{self.port}/health", timeout=10)
        health.raise_for_status()
        models = requests.get(f"{self.base_url}/models", headers=self.auth(), timeout=10).json()
        self.model = models["data"][0]["id"]
        self.max_context = models["data"][0]["max_model_len"]

    def _read_stderr(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def _wait_for(self, pattern):
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError("kvshard serve exited:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        raise RuntimeError(f"kvshard serve did not print /{pattern}/ in {STARTUP_SECONDS} s:\n"
                           + "\n".join(self.lines))

    @staticmethod
    def auth(key=API_KEY):
        return {"Authorization": f"Bearer {key}"}

    def alive(self) -> bool:
        if self.process.poll() is not None:
            return False
        return requests.get(f"http://127.0.0.1:{self.port}/health", timeout=10).status_code == 200

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def server(kvshard_binary, model_path, tmp_path_factory):
    s = Server(kvshard_binary, model_path, tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()
    assert s.process.returncode == 0, "kvshard serve did not shut down cleanly:\n" + "\n".join(s.lines)


@pytest.fixture()
def client(server):
    import openai
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=300)
