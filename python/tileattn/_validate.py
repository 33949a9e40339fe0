"""The checks every public call shares, written once.

Each check takes the argument's name as the caller spelled it and raises a
typed error (tileattn's ``InvalidParameterError`` / ``DTypeError``) that names
it and says what was expected. Python's ``bool`` is an ``int``; no check of an
integer or a real accepts one, since ``True`` passed as a size or a rate is a
mistake, never an intent.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ._errors import DTypeError, InvalidParameterError

COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# bfloat16, the NumPy extension dtype of ml_dtypes (as JAX and ONNX tooling
# use it). Its kind is 'V' and it is no np.floating: test for it by name.
# ml_dtypes is a dependency; without it (a source build into a bare
# environment) bf16 arrays are unavailable, bf16 products still run.
try:
    import ml_dtypes
    BFLOAT16: Optional[np.dtype[Any]] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    BFLOAT16 = None

# The IEEE storage dtypes (float16 is widened to float32 by the kernels), and
# those the attention functions and the modules' inputs take (bfloat16 too,
# computed in float32).
FLOAT_DTYPES = (np.dtype(np.float16),) + COMPUTE_DTYPES
INPUT_DTYPES = FLOAT_DTYPES + ((BFLOAT16,) if BFLOAT16 is not None else ())
FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def is_bfloat16(dtype: Any) -> bool:
    return BFLOAT16 is not None and isinstance(dtype, np.dtype) and dtype == BFLOAT16


def bf16_products(value: Any, dtype: np.dtype[Any], name: str = "compute_dtype") -> bool:
    """Whether a module of ``dtype`` computes its products on bfloat16
    operands: ``compute_dtype`` None or the module's dtype (no), or
    "bfloat16" / ml_dtypes.bfloat16 (yes: float32 modules only; inputs and
    outputs stay float32, sums float32)."""
    if value is None:
        return False
    if isinstance(value, str) and value == "bfloat16":
        dt: Optional[np.dtype[Any]] = BFLOAT16
        named = True
    else:
        named = False
        try:
            dt = np.dtype(value)
        except TypeError:
            dt = None
    if dt is not None and dt == dtype:
        return False
    if not named and (dt is None or not is_bfloat16(dt)):
        raise DTypeError(f"{name}: expected None, 'bfloat16' or the module's dtype "
                         f"({dtype.name}), got {value!r}")
    if dtype != np.float32:
        raise DTypeError(f"{name}: 'bfloat16' products take float32 computations (float32, "
                         f"float16 or bfloat16 data), got {dtype.name}")
    return True


def is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def positive_int(name: str, value: Any) -> int:
    if is_bool(value) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidParameterError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def optional_positive_int(name: str, value: Any, default: int) -> int:
    return default if value is None else positive_int(name, value)


def flag(name: str, value: Any) -> bool:
    if not is_bool(value):
        raise InvalidParameterError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def seed(value: Any, name: str = "seed") -> Optional[int]:
    """None (fresh entropy) or a non-negative int."""
    if value is None:
        return None
    if is_bool(value) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidParameterError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def dropout_rate(value: Any, name: str = "dropout") -> float:
    if is_bool(value) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise InvalidParameterError(f"{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


def positive_real(name: str, value: Any) -> float:
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(f"{name}: expected a positive number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InvalidParameterError(f"{name}: expected a positive finite number, got {v}")
    return v


def shape_str(shape: tuple[int, ...]) -> str:
    """A shape as NumPy prints it: (3,) for one axis."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def native_byte_order(a: np.ndarray) -> np.ndarray:
    """a itself, or a copy in the machine's byte order when it is a float
    array stored the other way round (a big-endian file read on x86): the
    same values, which the kernels can read."""
    if a.dtype.kind == "f" and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def float_array(x: Any, name: str) -> np.ndarray:
    """x as an array of a storage dtype (no copy of an ndarray in the
    machine's byte order; see native_byte_order)."""
    a = native_byte_order(x if isinstance(x, np.ndarray) else np.asarray(x))
    if a.dtype not in INPUT_DTYPES:
        raise DTypeError(f"{name}: expected {FLOAT_NAMES}, got {a.dtype} "
                         f"with shape {a.shape}")
    return a


def dtype_in(name: str, value: Any, allowed: Sequence[np.dtype[Any]], expected: str,
             unparsable: Optional[str] = None) -> np.dtype[Any]:
    """value read as a NumPy dtype, which must be one of allowed.

    ``expected`` names the allowed dtypes in the error; ``unparsable``, when
    given, replaces it in the error for a value NumPy cannot read as a dtype.
    """
    try:
        dt: np.dtype[Any] = np.dtype(value)
    except TypeError:
        raise DTypeError(f"{name}: expected {unparsable or expected}, got {value!r}") from None
    if dt not in allowed:
        raise DTypeError(f"{name}: expected {expected}, got {dt}")
    return dt


def entries_within(values: np.ndarray, upper: Any, message: Callable[[int], str]) -> None:
    """Raise InvalidParameterError(message(i)) for the first i where values[i]
    is outside [0, upper] (upper: one bound or one per entry)."""
    bad = np.flatnonzero((values < 0) | (values > upper))
    if bad.size:
        raise InvalidParameterError(message(int(bad[0])))
