"""Type stub of the private C++ extension (see csrc/module.cpp)."""

from typing import Any, Dict, List, Optional, TypedDict

import numpy as np
import numpy.typing as npt
from typing_extensions import Required, Unpack

_Floats = npt.NDArray[np.floating[Any]]

# The keyword-only options the forward and the backward kernel share (same
# names and defaults in csrc/module.cpp): one list, so the two cannot drift.
# Defaults: window_left = window_right = -1 (unbounded), dropout_p = 0.0,
# seed = 0, the arrays None.
class _KernelOptions(TypedDict, total=False):
    scale: Required[float]
    window_left: int
    window_right: int
    mask: Optional[npt.NDArray[Any]]
    key_padding: Optional[npt.NDArray[np.bool_]]
    dropout_p: float
    seed: int
    key_lengths: Optional[npt.NDArray[np.int64]]

def attention_forward(
    q: _Floats,
    k: _Floats,
    v: _Floats,
    out: _Floats,
    *,
    weights: Optional[_Floats] = None,
    lse: Optional[_Floats] = None,
    **options: Unpack[_KernelOptions],
) -> None: ...
def linear_forward(x: _Floats, w: _Floats, bias: Optional[_Floats], out: _Floats) -> None: ...
def copy_dense(src: np.ndarray, dst: np.ndarray) -> None: ...
def attention_backward(
    q: _Floats,
    k: _Floats,
    v: _Floats,
    out: _Floats,
    lse: _Floats,
    dout: _Floats,
    dq: _Floats,
    dk: _Floats,
    dv: _Floats,
    *,
    dscores: Optional[_Floats] = None,
    **options: Unpack[_KernelOptions],
) -> None: ...
def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def default_num_threads() -> int: ...
def isa() -> str: ...
def set_isa(name: str) -> None: ...
def isas_built() -> List[str]: ...
def isas_supported() -> List[str]: ...
def cpu_features() -> Dict[str, bool]: ...
def build_info() -> Dict[str, Any]: ...
def _parallel_probe(num_tasks: int, fail_at: int) -> int: ...
def _spin_probe(num_tasks: int, seconds: float) -> None: ...
