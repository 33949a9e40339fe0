"""The embedding service's parts that need no model: the dynamic batcher
(with a stand-in model whose rows say which text they came from) and the
request parsing with its limits."""

import asyncio
import json
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from embedding_server.batcher import Batcher, QueueFull  # noqa: E402
from embedding_server.limits import Limits, RequestError  # noqa: E402
from embedding_server.parse import embed_request, openai_request  # noqa: E402


class StandIn:
    """Row i of a call is [number of the text, the call's index]; optionally
    blocks until released, so tests can queue requests behind a batch."""

    def __init__(self, gate=None):
        self.calls = []
        self.gate = gate

    def __call__(self, texts):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(list(texts))
        return np.array([[float(t), len(self.calls) - 1] for t in texts])


class Observed:
    def __init__(self):
        self.batches, self.waits, self.computed = [], [], []

    def batch_formed(self, texts, tokens, requests):
        self.batches.append((texts, tokens, requests))

    def queue_waited(self, seconds):
        self.waits.append(seconds)

    def batch_computed(self, seconds):
        self.computed.append(seconds)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_batch_and_get_their_own_rows():
    model, seen = StandIn(), Observed()

    async def main():
        b = Batcher(model, token_budget=1000, max_wait=0.05, observer=seen)
        b.start()
        jobs = [b.embed([str(10 * i + j) for j in range(i + 1)], 5) for i in range(4)]
        rows = await asyncio.gather(*jobs)
        await b.stop()
        return rows

    rows = run(main())
    assert len(model.calls) == 1 and len(model.calls[0]) == 10
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(r[:, 0], [10 * i + j for j in range(i + 1)])
    assert seen.batches == [(10, 20, 4)] and len(seen.waits) == 4


def test_token_budget_splits_batches_and_a_large_request_runs_alone():
    model, seen = StandIn(), Observed()

    async def main():
        b = Batcher(model, token_budget=10, max_wait=0.05, observer=seen)
        b.start()
        rows = await asyncio.gather(b.embed(["1"], 6), b.embed(["2"], 6), b.embed(["3"], 25),
                                    b.embed(["4"], 4))
        await b.stop()
        return rows

    rows = run(main())
    # queued at once: 6+6 > 10 splits 1 from 2; 25 runs alone; 25+4 > 10
    assert model.calls == [["1"], ["2"], ["3"], ["4"]]
    assert seen.batches == [(1, 6, 1), (1, 6, 1), (1, 25, 1), (1, 4, 1)]
    assert [int(r[0, 0]) for r in rows] == [1, 2, 3, 4]


def test_a_full_queue_refuses_at_once_and_recovers():
    gate = threading.Event()
    model = StandIn(gate)

    async def main():
        b = Batcher(model, token_budget=4, max_wait=0.0, max_queued_texts=3)
        b.start()
        first = asyncio.ensure_future(b.embed(["1"], 1))
        await asyncio.sleep(0.05)                   # taken: the model blocks on it
        queued = [asyncio.ensure_future(b.embed([str(i)], 1)) for i in (2, 3, 4)]
        await asyncio.sleep(0)
        assert b.queued_texts == 3
        with pytest.raises(QueueFull, match="max_queued_texts 3"):
            await b.embed(["5"], 1)
        gate.set()
        got = await asyncio.gather(first, *queued)
        again = await b.embed(["6"], 1)            # room again
        await b.stop()
        return got, again

    got, again = run(main())
    assert [int(r[0, 0]) for r in got] == [1, 2, 3, 4] and int(again[0, 0]) == 6


def test_a_failing_model_fails_every_request_of_its_batch_only():
    def flaky(texts):
        if "bad" in texts:
            raise RuntimeError("model failed")
        return np.ones((len(texts), 2))

    async def main():
        b = Batcher(flaky, token_budget=100, max_wait=0.05)
        b.start()
        r = await asyncio.gather(b.embed(["bad"], 1), b.embed(["ok"], 1),
                                 return_exceptions=True)
        after = await b.embed(["ok"], 1)
        await b.stop()
        return r, after

    (a, c), after = run(main())
    assert isinstance(a, RuntimeError) and isinstance(c, RuntimeError)
    assert after.shape == (1, 2)


LIMITS = Limits(max_texts=3, max_chars=10, max_queued_texts=3)


@pytest.mark.parametrize("body, status, message", [
    (b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    (b'{"texts": [' + b"1" * 5000 + b"]}", 400, "JSON value refused"),
    (b'{"texts": ["ok", "\\ud800x"]}', 400, r"texts\[1\]: not valid Unicode \(lone surrogate"),
    (b'{"texts": ["a", "b", "c", "d"]}', 413, r"at most 3 texts per request \(max_texts\)"),
    (b'{"texts": ["abcdefghijk"]}', 413, r"texts\[0\]: at most 10 characters"),
    (b'{"text": ["a"]}', 400, "text: expected a string, got an array"),
    (b"null", 400, "expected a JSON object, got null"),
])
def test_embed_request_refusals_name_the_field(body, status, message):
    with pytest.raises(RequestError) as e:
        embed_request(body, LIMITS)
    assert e.value.status == status
    assert re.search(message, e.value.message), e.value.message


def test_openai_request_shapes():
    r = openai_request(json.dumps({"input": "hi", "model": "x"}).encode(), LIMITS, 384)
    assert r.texts == ["hi"] and r.encoding_format == "float"
    r = openai_request(json.dumps({"input": ["a", "b"], "encoding_format": "base64",
                                   "dimensions": 384, "user": "u"}).encode(), LIMITS, 384)
    assert r.texts == ["a", "b"] and r.encoding_format == "base64"
    for payload, status, param in [({"model": "x"}, 400, "input"),
                                   ({"input": [101, 102]}, 422, "input"),
                                   ({"input": [[101]]}, 422, "input"),
                                   ({"input": "a", "dimensions": 128}, 422, "dimensions"),
                                   ({"input": "a", "encoding_format": "hex"}, 400,
                                    "encoding_format"),
                                   ({"input": "a", "model": 3}, 400, "model"),
                                   ({"input": "a", "stream": True}, 400, "stream"),
                                   ({"input": []}, 400, "input")]:
        with pytest.raises(RequestError) as e:
            openai_request(json.dumps(payload).encode(), LIMITS, 384)
        assert (e.value.status, e.value.param) == (status, param), payload


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="header_timeout: expected > 0"):
        Limits(header_timeout=0)
    with pytest.raises(ValueError, match="max_queued_texts: expected >= max_texts"):
        Limits(max_texts=10, max_queued_texts=5)
