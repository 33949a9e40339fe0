"""Thread-count control for the C++ thread pool."""

from __future__ import annotations

import operator
import os
import warnings

from . import _core
from ._errors import InvalidParameterError

MAX_THREADS = 4096


def set_num_threads(n: int) -> None:
    """Set how many threads tileattn's kernels use (>= 1).

    Results do not depend on this number: the tiling is fixed by the shapes,
    so any thread count gives bitwise identical outputs. It may be called at
    any time, also while other threads are running attention.
    """
    if isinstance(n, bool):
        raise InvalidParameterError(f"set_num_threads: n must be an integer, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise InvalidParameterError(
            f"set_num_threads: n must be an integer, got {type(n).__name__}"
        ) from None
    if not 1 <= n <= MAX_THREADS:
        raise InvalidParameterError(f"set_num_threads: n must be in [1, {MAX_THREADS}], got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads tileattn's kernels use."""
    return int(_core.num_threads())


def _check_env() -> None:
    """Warn (once, at import) about a TILEATTN_NUM_THREADS we cannot use."""
    value = os.environ.get("TILEATTN_NUM_THREADS")
    if value is None or value == "":
        return
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        warnings.warn(
            f"TILEATTN_NUM_THREADS={value!r} is not an integer in [1, {MAX_THREADS}]; "
            f"using the default of {_core.default_num_threads()} threads",
            RuntimeWarning,
            stacklevel=3,
        )
