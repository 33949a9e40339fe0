"""Sizes no memory holds: a typed MemoryError instead of NumPy's ValueError."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_MAX_BYTES = int(np.iinfo(np.intp).max)


def check_fits(what: str, shape: Sequence[int], itemsize: int) -> None:
    """Raise MemoryError when an array of `shape` x `itemsize` bytes exceeds
    NumPy's index type. NumPy itself refuses such shapes with a ValueError
    ("array is too big"), which reads as a bad argument; it is a size no
    machine can allocate, so it gets the error an allocation failure gives."""
    dims = [int(n) for n in shape]
    if max([math.prod(dims), *dims]) * itemsize > _MAX_BYTES:
        raise MemoryError(f"{what}: an array of shape {tuple(dims)} "
                          f"({itemsize} bytes each) does not fit in memory")
