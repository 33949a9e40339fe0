"""Activations of the feed-forward block: relu, exact gelu, tanh gelu, silu.

They work *in place* on a C-contiguous float32/float64 array the caller owns
(the first linear layer's fresh output), in cache-sized chunks spread over
``tileattn.get_num_threads()`` threads. The feed-forward hidden array is the
largest one a transformer layer touches (B*L x 4E); a dozen whole-array NumPy
passes over it would run at memory speed on one core, chunks of it stay in
cache and NumPy's ufuncs release the GIL, so threads help.

NumPy has no ``erf``; the exact GELU ``x * Phi(x)`` is evaluated two ways,
with coefficients fitted by ``tools/fit_gelu.py`` (see it for the method):

- float32: ``Phi(x) = (1 + tanh(x * G(x**2))) / 2`` with ``G`` a degree-6
  polynomial (the tanh approximation is the degree-1 case): |error| below
  1.6e-7 * max(1, |x|) (torch's float32 erf GELU: 3.3e-7). float32 GELU,
  tanh GELU and SiLU run in the C++ core (``kernel_activation.h``) as
  ``x * sigmoid(k(x))``, with this ``G`` for the exact GELU, in one
  vectorised pass on tileattn's pool: the 18 NumPy passes did not get
  faster with threads. The NumPy forms below remain for float64 and for
  the derivatives.
- float64: ``Phi(-|x|) = erfc(z) / 2 = t exp(-z**2 + P(u)) / 2`` with
  ``z = |x| / sqrt(2)``, ``t = 1 / (1 + z / 2)``, ``u`` affine in ``t`` and
  ``P`` of degree 24 (fitted for z <= 27, where Phi(-|x|) underflows):
  relative error of erfc below 1e-15; the positive side uses
  ``x Phi(x) = x (1 - Phi(-x))``, so both tails keep relative precision.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from ._errors import DTypeError, InvalidParameterError
from ._threads import get_num_threads

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")

# float64: (scale, shift, coefficients highest power first) of P;
# log(0.5) (the 0.5 of Phi = erfc / 2) is folded into the constant term.
_ERFC_FIT: Tuple[float, float, Tuple[float, ...]] = (2.1481481481481484, -1.1481481481481481, (
        -2.624281331458744e-09, 1.1077638317749811e-09, 2.4219402226598065e-08,
        -2.8994871280368578e-08, -9.096927094884265e-08, 2.442742032801511e-07,
        4.0039094777467086e-08, -1.0926222861839547e-06, 1.447134751408579e-06,
        2.56243480423483e-06, -9.515087695214803e-06, 1.6007522947392615e-06,
        3.6965000615173354e-05, -4.87435412478421e-05, -9.848967803078982e-05,
        0.0002990965016716381, 0.00013733777062331407, -0.0014044549226272347,
        0.0004070716746788545, 0.006518319886702991, -0.005057692508341054,
        -0.039698260230703594, 0.032409287681125075, 0.6316996845897369,
        -0.625195311888113 + math.log(0.5)))
# float32: G(s), s = x**2, highest power first (fitted on |x| <= 6; beyond,
# tanh(x G(x^2)) is +-1 in float32).
_TANH_FORM = (1.8057371101730898e-09, -1.3345181511402812e-07, 3.9691971355192925e-06,
              -5.5240798949187177e-05, -3.312787539206396e-05, 0.03633428079089695,
              0.7978842168710767)
# The same polynomial in t = (x/2)^2, times 2: H(t) = 2 G(4 t).
_HALF_FORM = tuple(2.0 * c * 4.0 ** k for k, c in enumerate(reversed(_TANH_FORM)))[::-1]

# Elements per chunk. Each NumPy call holds the GIL for ~1 us of dispatch, so
# chunks must be large for threads to overlap (16K elements: 2 threads were
# slower than 1); 64K float32 (256 KB) x 4 live arrays still fit a 1-2 MB L2.
_CHUNK = 65536
_SQRT_HALF = math.sqrt(0.5)
_GELU_TANH_C = math.sqrt(2.0 / math.pi)

_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _executor(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least n threads; recreated after a fork (the
    parent's threads do not exist in the child) and when more are asked."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < n:
            old = _pool if _pool_pid == os.getpid() else None
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tileattn-act")
            _pool_pid = os.getpid()
            if old is not None:
                old.shutdown(wait=False)     # running work finishes; its threads then exit
        return _pool


def _poly(coefs: Tuple[float, ...], t: np.ndarray) -> np.ndarray:
    """Horner's rule, highest power first (two coefficients or more), in a
    new array of t's dtype; the caller sets errstate."""
    f = t.dtype.type
    p: np.ndarray = t * f(coefs[0])
    for c in coefs[1:-1]:
        p += f(c)
        p *= t
    p += f(coefs[-1])
    return p


def _gelu_chunk(x: np.ndarray) -> None:
    if x.dtype == np.float64:
        _gelu_erfc(x)
        return
    # With y = x / 2 and t = y^2: g = x G(x^2) = y H(t), H(t) = 2 G(4 t), and
    # gelu = y + y tanh(g): 18 passes, no clamp (H > 0 everywhere, so a huge
    # |x| gives tanh = +-1; its overflow to inf is harmless).
    f = x.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):
        x *= f(0.5)
        t = x * x
        p = _poly(_HALF_FORM, t)
        p *= x
        np.tanh(p, out=p)
        p *= x
        x += p


def _gelu_erfc(x: np.ndarray) -> None:
    scale, shift, coefs = _ERFC_FIT
    f = x.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.abs(x)
        z *= f(_SQRT_HALF)
        t = z * f(0.5)
        t += f(1.0)
        np.divide(f(1.0), t, out=t)
        u = t * f(scale)
        u += f(shift)            # z > 27 lands a little below -1: exp underflows there anyway
        p = _poly(coefs, u)
        z *= z
        p -= z
        np.exp(p, out=p)
        p *= t                   # p = Phi(-|x|)
        # x Phi(x) = x (1 - Phi(-x)) for x > 0: 1 - p >= 1/2 keeps full precision.
        np.subtract(f(1.0), p, out=p, where=np.greater(x, 0))
        x *= p


def _gelu_tanh_chunk(x: np.ndarray) -> None:
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); x^3 may overflow to
    # +-inf for huge |x|, where tanh is +-1 anyway.
    f = x.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):
        s = x * x
        s *= f(0.044715)
        s += f(1.0)
        s *= x
        s *= f(_GELU_TANH_C)
        np.tanh(s, out=s)
        s += f(1.0)
        s *= f(0.5)
        x *= s


def _silu_chunk(x: np.ndarray) -> None:
    # x * sigmoid(x) with sigmoid(x) = (1 + tanh(x/2)) / 2: no exp overflow.
    s = x * x.dtype.type(0.5)
    np.tanh(s, out=s)
    s += x.dtype.type(1.0)
    s *= x.dtype.type(0.5)
    x *= s


def _relu_chunk(x: np.ndarray) -> None:
    np.maximum(x, 0, out=x)


_CHUNK_FNS: Dict[str, Callable[[np.ndarray], None]] = {
    "relu": _relu_chunk, "gelu": _gelu_chunk, "gelu_tanh": _gelu_tanh_chunk,
    "silu": _silu_chunk,
}


def check_activation(name: object) -> str:
    if not isinstance(name, str) or name not in _CHUNK_FNS:
        raise InvalidParameterError(
            f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {name!r}")
    return name


def activation_(name: str, x: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """Apply activation ``name`` to ``x`` (+ ``bias``) in place and return ``x``.

    Parameters
    ----------
    name : "relu", "gelu" (exact, erf), "gelu_tanh" or "silu"
    x : C-contiguous float32 or float64 array, any shape
    bias : (x.shape[-1],) array, optional
        Added first, chunk by chunk (one pass less over memory than a
        separate ``x += bias``).
    """
    fn = _CHUNK_FNS[check_activation(name)]
    if x.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise DTypeError(f"x: expected float32 or float64, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise InvalidParameterError("x: expected a C-contiguous array (it is updated in place)")
    width = x.shape[-1] if x.ndim else 1
    if bias is not None and (bias.shape != (width,) or x.ndim == 0):
        raise InvalidParameterError(f"bias: expected shape ({width},), got {bias.shape}")
    if x.dtype == np.float32 and name != "relu" and x.size:
        # The core: one vectorised pass on tileattn's pool (kernel_activation.h).
        _core.activation_rows(x.reshape(-1, width), name,
                              None if bias is None else np.ascontiguousarray(bias, np.float32))
        return x
    chunks: List[np.ndarray]
    if bias is None:
        flat = x.reshape(-1)
        chunks = [flat[i:i + _CHUNK] for i in range(0, flat.size, _CHUNK)]
    else:   # whole rows, so that the bias broadcasts; about _CHUNK elements each
        rows = x.reshape(-1, width)
        step = max(1, _CHUNK // max(width, 1))
        chunks = [rows[i:i + step] for i in range(0, rows.shape[0], step)]

    def work(run: List[np.ndarray]) -> None:
        for c in run:
            if bias is not None:
                c += bias
            fn(c)

    threads = min(get_num_threads(), len(chunks))
    if threads <= 1:
        work(chunks)
    else:
        # Contiguous runs of chunks per thread: each thread streams its part.
        per = -(-len(chunks) // threads)
        runs = [chunks[i:i + per] for i in range(0, len(chunks), per)]
        for f in [_executor(threads).submit(work, r) for r in runs]:
            f.result()
    return x


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """Out-of-place ``activation_``: a new C-contiguous array."""
    return activation_(name, np.array(x, order="C", copy=True))


# -- derivatives (the backward passes) -----------------------------------------
def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x) (a new array of x's float dtype) with the fits the exact GELU
    uses: float64 through erfc, float32 through the tanh form."""
    f = x.dtype.type
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if x.dtype == np.float64:
            scale, shift, coefs = _ERFC_FIT
            z = np.abs(x) * f(_SQRT_HALF)
            t = f(1.0) / (z * f(0.5) + f(1.0))
            p = _poly(coefs, t * f(scale) + f(shift))
            p -= z * z
            p = np.exp(p) * t                   # Phi(-|x|), full relative precision
            cdf: np.ndarray = np.where(x > 0, f(1.0) - p, p)
            return cdf
        y = x * f(0.5)
        g = _poly(_HALF_FORM, y * y) * y
        cdf = (np.tanh(g) + f(1.0)) * f(0.5)
        return cdf


def _gelu_grad(x: np.ndarray) -> np.ndarray:
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    f = x.dtype.type
    with np.errstate(over="ignore", under="ignore"):
        pdf = np.exp(x * x * f(-0.5)) * f(1.0 / math.sqrt(2.0 * math.pi))
    d: np.ndarray = normal_cdf(x) + x * pdf
    return d


def _gelu_tanh_grad(x: np.ndarray) -> np.ndarray:
    # 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), t = tanh(c (x + a x^3))
    f = x.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):
        x2 = x * x
        t = np.tanh(x * (x2 * f(0.044715) + f(1.0)) * f(_GELU_TANH_C))
        inner = (x2 * f(3 * 0.044715) + f(1.0)) * f(_GELU_TANH_C)
        flat = f(1.0) - t * t
        # Huge |x|: inner overflows where tanh is flat (0 * inf); the slope is 0.
        d: np.ndarray = np.where(flat == 0, f(0.0), x * flat * inner)
        d += t
        d += f(1.0)
        d *= f(0.5)
        return d


def _silu_grad(x: np.ndarray) -> np.ndarray:
    # sigmoid(x) (1 + x (1 - sigmoid(x))), sigmoid via tanh (no exp overflow)
    f = x.dtype.type
    s = (np.tanh(x * f(0.5)) + f(1.0)) * f(0.5)
    d: np.ndarray = s * (x * (f(1.0) - s) + f(1.0))
    return d


def _relu_grad(x: np.ndarray) -> np.ndarray:
    return (x > 0).astype(x.dtype)      # 0 at x == 0, as PyTorch


_GRAD_FNS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": _relu_grad, "gelu": _gelu_grad, "gelu_tanh": _gelu_tanh_grad,
    "silu": _silu_grad,
}


def activation_backward(name: str, pre: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """dL/d(pre) = grad * f'(pre) for ``activation_(name, pre)``; pre and
    grad are same-shaped float arrays; returns a new array of pre's dtype."""
    d = _GRAD_FNS[check_activation(name)](pre)
    d *= grad
    return d
