"""Type stub of the private C++ extension (see csrc/module.cpp)."""

from typing import Any, Dict, List, Optional

import numpy as np
import numpy.typing as npt

def attention_forward(
    q: npt.NDArray[np.floating[Any]],
    k: npt.NDArray[np.floating[Any]],
    v: npt.NDArray[np.floating[Any]],
    out: npt.NDArray[np.floating[Any]],
    *,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    mask: Optional[npt.NDArray[Any]] = None,
    key_padding: Optional[npt.NDArray[np.bool_]] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    weights: Optional[npt.NDArray[np.floating[Any]]] = None,
    lse: Optional[npt.NDArray[np.floating[Any]]] = None,
    key_lengths: Optional[npt.NDArray[np.int64]] = None,
) -> None: ...
def attention_backward(
    q: npt.NDArray[np.floating[Any]],
    k: npt.NDArray[np.floating[Any]],
    v: npt.NDArray[np.floating[Any]],
    out: npt.NDArray[np.floating[Any]],
    lse: npt.NDArray[np.floating[Any]],
    dout: npt.NDArray[np.floating[Any]],
    dq: npt.NDArray[np.floating[Any]],
    dk: npt.NDArray[np.floating[Any]],
    dv: npt.NDArray[np.floating[Any]],
    *,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    mask: Optional[npt.NDArray[Any]] = None,
    key_padding: Optional[npt.NDArray[np.bool_]] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    key_lengths: Optional[npt.NDArray[np.int64]] = None,
    dscores: Optional[npt.NDArray[np.floating[Any]]] = None,
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
