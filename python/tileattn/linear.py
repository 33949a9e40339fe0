"""``Linear``: ``y = x W^T + b`` with PyTorch's weight layout."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union, cast

import numpy as np

from . import _core
from ._budget import charge
from ._errors import DTypeError, FrozenModuleError, InvalidParameterError, ShapeError
from ._memory import check_fits
from ._compute_dtype import ComputeDtypeOption
from ._frozen import FrozenParameter, PackedRows
from ._validate import flag, float_array, positive_int, shape_str
from .module import Module


def glorot_uniform(rng: np.random.Generator, out_features: int, in_features: int,
                   dtype: np.dtype) -> np.ndarray:
    """Glorot/Xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)), the
    kernel initialiser of Keras and of PyTorch's attention in-projection."""
    check_fits("glorot_uniform", (out_features, in_features), 8)  # drawn in float64
    fans = in_features + out_features
    limit = np.sqrt(6.0 / fans) if fans else 0.0
    return rng.uniform(-limit, limit, (out_features, in_features)).astype(dtype)


def as_2d_rows(x: np.ndarray) -> np.ndarray:
    """(..., F) -> (N, F): one GEMM instead of a batch of small ones (a free
    reshape when x is contiguous)."""
    return x.reshape(-1, x.shape[-1])


# The dtypes the core's GEMM computes in.
_CORE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _rows_contiguous(a: np.ndarray) -> bool:
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize) \
        and a.strides[0] >= 0 and a.strides[0] % a.itemsize == 0


def affine(rows: np.ndarray, weight: Union[np.ndarray, "_core.PackedLinear"],
           bias: Optional[np.ndarray]) -> np.ndarray:
    """rows (M, in) @ weight.T (+ bias) -> (M, out), as NumPy would type it.

    For float32 and float64 operands of one dtype (every module's) the
    product runs in the C++ core on tileattn's pool, for any M, not in
    NumPy's BLAS: each output element is summed in a fixed order, so a row
    has the same bits whatever the thread count and whatever rows are
    around it (NumPy's BLAS picks its method by the shape); a decode step's
    few rows take the core's skinny path, which streams the weight once.
    And OpenBLAS keeps its threads spinning for ~0.1 s after a call, which
    slowed the attention core after a projection 1.5x. ``weight`` is an
    array, or better the weight packed by ``_core.pack_linear`` (a
    ``Linear``'s ``packed_weight()``): that saves packing it on every call."""
    dt = weight.dtype
    if rows.dtype != dt or dt not in _CORE_DTYPES or (bias is not None and bias.dtype != dt):
        w = _core.unpack_linear(weight) if isinstance(weight, _core.PackedLinear) else weight
        y: np.ndarray = rows @ w.T
        if bias is not None:
            y += bias
        return y
    if not _rows_contiguous(rows):
        rows = np.ascontiguousarray(rows)
    out = np.empty((rows.shape[0], _out_features(weight)), dt)
    if out.size == 0:
        return out
    b = None if bias is None else np.ascontiguousarray(bias)
    if isinstance(weight, _core.PackedLinear):
        _core.linear_forward_packed(rows, weight, b, out)
    else:
        _core.linear_forward(rows, weight if _rows_contiguous(weight)
                             else np.ascontiguousarray(weight), b, out)
    return out


def _out_features(weight: Union[np.ndarray, "_core.PackedLinear"]) -> int:
    return weight.out_features if isinstance(weight, _core.PackedLinear) else weight.shape[0]


def grad_input(grad: Any, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A backward's incoming gradient as an array of the forward output's
    ``shape``, in the module's compute ``dtype``."""
    g = grad if isinstance(grad, np.ndarray) else np.asarray(grad)
    if g.dtype.kind != "f":
        raise DTypeError(f"grad_output: expected a float array, got dtype {g.dtype}")
    if g.shape != shape:
        raise ShapeError(f"grad_output: expected shape {shape} (the forward's output), "
                         f"got {g.shape}")
    return g.astype(dtype, copy=False)


def linear_backward(lin: "Linear", x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """For y = x W^T + b with x (..., in), g = dL/dy (..., out): adds
    g^T x into lin's weight gradient and sum(g) into its bias gradient, and
    returns dL/dx = g W (..., in) in lin's dtype."""
    rows, grows = as_2d_rows(x), as_2d_rows(g)
    lin.add_grads(grows.T @ rows.astype(lin.dtype, copy=False),
                  grows.sum(axis=0) if lin.bias is not None else None)
    dx: np.ndarray = grows @ lin.weight
    return dx.reshape(x.shape)


class Linear(ComputeDtypeOption, Module):
    """Affine map of the last axis.

    Parameters
    ----------
    in_features, out_features : int
        Positive.
    bias : bool
    dtype : float32 or float64
    rng : numpy Generator, optional
        Source of the Glorot-uniform weight; the bias starts at zero.
    compute_dtype : None or "bfloat16"
        "bfloat16" (float32 layers): the product runs on bf16 operands, x
        and the weight rounded to bf16 (to nearest even), with float32
        sums; x, the bias and the output stay float32. The weight is
        packed once in bf16 (half the bytes a decode step streams); the
        float32 ``weight`` stays the master copy that training updates.

    Raises ``InvalidParameterError`` naming the argument for a size that is
    not a positive int (``1.7``, ``-1``, ``True``), a non-bool ``bias`` or an
    ``rng`` that is not a Generator; ``DTypeError`` for another dtype;
    ``MemoryError`` for a weight no memory holds.

    Parameters (arrays)
    -------------------
    weight : (out_features, in_features)
    bias : (out_features,) or None
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = np.float32, rng: Optional[np.random.Generator] = None,
                 compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        self._set_compute_dtype(compute_dtype, self.dtype)
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        bias = flag("bias", bias)
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise InvalidParameterError(
                f"rng: expected a numpy Generator or None, got {type(rng).__name__}")
        check_fits("Linear weight", (self.out_features, self.in_features), self.dtype.itemsize)
        charge("Linear", (self.out_features, self.in_features), (self.out_features * bias,))
        rng = np.random.default_rng() if rng is None else rng
        self.register_parameter("weight", glorot_uniform(rng, self.out_features,
                                                          self.in_features, self.dtype))
        self.register_parameter("bias", np.zeros(self.out_features, self.dtype) if bias else None)

    def forward(self, x: Any, *, training: bool = False) -> np.ndarray:
        """x (..., in_features), a float16/32/64 array (or nested lists of
        floats), -> (..., out_features), in the module's dtype (float16 in a
        float32 module gives float32). With ``training=True`` x is kept (not
        copied: leave it unchanged) for ``backward``. Integer, complex or
        object input raises ``DTypeError``; x with no axis or another last
        axis ``ShapeError``."""
        x = float_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"x: expected last axis {self.in_features} (in_features), "
                             f"got shape {shape_str(x.shape)}")
        y = affine(as_2d_rows(x.astype(self.dtype, copy=False)), self.packed_weight(),
                   self.bias)
        if flag("training", training):
            self._save(x)
        return cast(np.ndarray, y.reshape(x.shape[:-1] + (self.out_features,)))

    def backward(self, grad_output: Any) -> np.ndarray:
        """grad_output (..., out_features) -> dL/dx (..., in_features) in x's
        dtype; adds dL/dweight and dL/dbias into ``grads``."""
        x = self._take_saved()
        g = grad_input(grad_output, x.shape[:-1] + (self.out_features,), self.dtype)
        dx = linear_backward(self, x, g)
        return dx.astype(x.dtype, copy=False)

    def add_grads(self, dweight: np.ndarray, dbias: Optional[np.ndarray]) -> None:
        """Add gradients computed elsewhere (a GEMM that projects through
        several Linear layers at once) into ``grads``."""
        self._accumulate("weight", dweight)
        if dbias is not None:
            self._accumulate("bias", dbias)

    def packed_weight(self) -> "_core.PackedLinear":
        """The weight packed in the layout the core's GEMM streams, made on
        first use and again after the weight changed (``version``) or the
        ISA path did. Kept beside the weight: a float32 layer holds its
        weight twice (1.5 times with bf16 products), until ``freeze()``
        keeps only this."""
        frozen = self._params["weight"]
        if isinstance(frozen, FrozenParameter):
            return frozen.packed()
        key = (self.version, _core.isa())
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            cached = (key, _core.pack_linear(self.weight, bf16=self.bf16))
            self.__dict__["_packed"] = cached
        packed: _core.PackedLinear = cached[1]
        return packed

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.pop("_packed", None)     # derived from the weight; remade on use
        return state

    def _packed_nbytes(self) -> int:
        frozen = self._params["weight"]
        if isinstance(frozen, FrozenParameter):    # a fused part's store counts with its parent
            return frozen.store.nbytes if frozen.whole else frozen.slice_nbytes
        cached = self.__dict__.get("_packed")
        return int(cached[1].nbytes) if cached else 0

    def _freeze_parameters(self) -> None:
        w = self._params["weight"]
        if isinstance(w, FrozenParameter):    # frozen by its parent (a fused matrix)
            return
        if w.base is not None:
            raise FrozenModuleError(
                "Linear.freeze: this layer's weight is part of a matrix its parent packs "
                "with others (an attention's Q/K/V); freeze the parent")
        cached = self.__dict__.get("_packed")
        current = cached[1] if cached and cached[0] == (self.version, _core.isa()) else None
        self.hold_packed(PackedRows(w, self.bf16, current), 0)

    def hold_packed(self, store: PackedRows, start: int) -> None:
        """Freezing: the weight becomes rows [start, start + out_features)
        of ``store`` (all of it, or this layer's part of a matrix fused
        by its parent), and the row-major array is let go."""
        self._params["weight"] = FrozenParameter(store, start, start + self.out_features)
        self.__dict__.pop("_packed", None)

    def share_storage(self, name: str, array: np.ndarray) -> None:
        """Make parameter ``name`` ("weight" or "bias") *be* ``array``, a
        view of a buffer that packs several layers' parameters."""
        self._rebind(name, array)

    def get_config(self) -> Dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": self.dtype.name,
                "compute_dtype": self.compute_dtype_option}

    @property
    def compute_dtype(self) -> str:
        """The products' operand dtype: "bfloat16" or the module's dtype."""
        return "bfloat16" if self.bf16 else self.dtype.name

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}" + self._compute_dtype_repr()
