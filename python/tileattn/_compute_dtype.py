"""The ``compute_dtype`` option of the modules that take it, in one place.

A module mixes ``ComputeDtypeOption`` in and calls ``_set_compute_dtype``
once in ``__init__``; ``bf16`` then says whether its products run on
bfloat16 operands, and the option reads back as it was given (configs,
reprs, and the sub-layers built with it).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ._validate import bf16_products


class ComputeDtypeOption:
    """``compute_dtype`` None or "bfloat16" on a float32 module."""

    bf16: bool = False

    def _set_compute_dtype(self, compute_dtype: Any, dtype: np.dtype[Any]) -> Optional[str]:
        """Checks and keeps ``compute_dtype``; returns it as
        ``compute_dtype_option`` reads it, for the sub-layers."""
        self.bf16 = bf16_products(compute_dtype, dtype)
        return self.compute_dtype_option

    @property
    def compute_dtype_option(self) -> Optional[str]:
        """compute_dtype as given: "bfloat16" or None."""
        return "bfloat16" if self.bf16 else None

    def _compute_dtype_repr(self) -> str:
        """The option's part of ``extra_repr`` (empty when None)."""
        return ", compute_dtype=bfloat16" if self.bf16 else ""


def bf16_values(a: np.ndarray) -> np.ndarray:
    """float32 ``a`` rounded to bfloat16 values, as float32: nearest even
    (as ml_dtypes rounds), a NaN stays a NaN. For products computed outside
    the core (NumPy's BLAS) on bf16 operands: each product of two such
    values is exact in float32."""
    x = np.ascontiguousarray(a, np.float32)
    u = x.view(np.uint32)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) \
        & np.uint32(0xFFFF0000)
    nan = np.isnan(x)
    if nan.any():
        r = np.where(nan, (u | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), r)
    out: np.ndarray = r.view(np.float32)
    return out
