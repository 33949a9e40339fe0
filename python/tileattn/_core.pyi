"""Type stub of the private C++ extension (see csrc/module.cpp)."""

from typing import Any, Dict, List, Optional

import numpy as np
import numpy.typing as npt

_Floats = npt.NDArray[np.floating[Any]]

# The options the forward and the backward kernel share, one object per call
# (csrc/module.cpp declares the struct; tileattn/_call.py fills it). The
# constructor takes any of the fields by name (keyword-only).
class AttentionOptions:
    scale: float  # default 1.0
    window_left: int  # default -1 (unbounded)
    window_right: int  # default -1 (unbounded)
    top_left: bool  # the bounds' alignment; default False (bottom-right)
    mask: Optional[npt.NDArray[Any]]
    key_padding: Optional[npt.NDArray[np.bool_]]
    key_lengths: Optional[npt.NDArray[np.int64]]
    dropout_p: float  # default 0.0
    seed: int  # default 0
    bf16: bool  # products on bf16 operands; default False
    def __init__(
        self,
        *,
        scale: float = 1.0,
        window_left: int = -1,
        window_right: int = -1,
        top_left: bool = False,
        mask: Optional[npt.NDArray[Any]] = None,
        key_padding: Optional[npt.NDArray[np.bool_]] = None,
        key_lengths: Optional[npt.NDArray[np.int64]] = None,
        dropout_p: float = 0.0,
        seed: int = 0,
        bf16: bool = False,
    ) -> None: ...

def attention_forward(
    q: _Floats,
    k: _Floats,
    v: _Floats,
    out: _Floats,
    options: AttentionOptions,
    weights: Optional[_Floats] = None,
    lse: Optional[_Floats] = None,
) -> None: ...
def attention_varlen(
    q: _Floats,
    k: _Floats,
    v: _Floats,
    out: _Floats,
    cu_seqlens_q: npt.NDArray[np.int64],
    cu_seqlens_k: npt.NDArray[np.int64],
    options: AttentionOptions,
) -> None: ...
def linear_forward(x: _Floats, w: _Floats, bias: Optional[_Floats], out: _Floats) -> None: ...

class PackedLinear:
    """A weight packed for the GEMM of the ISA path that packed it."""
    @property
    def out_features(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def isa(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def bf16(self) -> bool: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...

# bf16: for products on bf16 operands (w float32, rounded, or bfloat16).
def pack_linear(w: _Floats, bf16: bool = False) -> PackedLinear: ...
def unpack_linear(w: PackedLinear, start: int = 0, stop: Optional[int] = None) -> np.ndarray: ...
def release_free_memory() -> None: ...
def linear_forward_packed(x: _Floats, w: PackedLinear, bias: Optional[_Floats],
                          out: _Floats) -> None: ...
def copy_dense(src: np.ndarray, dst: np.ndarray) -> None: ...
def activation_rows(rows: np.ndarray, kind: str, bias: Optional[np.ndarray] = ...) -> None: ...
def move_rows(src: np.ndarray, src_index: Optional[np.ndarray], dst: np.ndarray,
              dst_index: Optional[np.ndarray], zero_index: Optional[np.ndarray] = ...) -> None: ...
def layer_norm_rows(rows: np.ndarray, weight: Optional[np.ndarray], bias: Optional[np.ndarray],
                    eps: float, inv_std: Optional[np.ndarray] = ...) -> None: ...
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
    options: AttentionOptions,
    dscores: Optional[_Floats] = None,
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
