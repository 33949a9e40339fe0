"""``LSTM``: a multi-layer LSTM for inference, with PyTorch's weights and results.

Per layer, the input projection of every time step is one GEMM up front
(``(L*B, In) x (In, 4H)``); the time loop then does one ``(B, H) x (H, 4H)``
GEMM per step plus ten in-place NumPy passes over ``(B, 4H)`` or ``(B, H)``
(all four gate nonlinearities in one tanh).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._budget import charge
from ._compute_dtype import ComputeDtypeOption, bf16_values
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._memory import check_fits
from ._validate import FLOAT_DTYPES, dropout_rate, flag, float_array, positive_int
from ._validate import seed as check_seed
from .dropout import dropout_
from .module import Module


class LSTM(ComputeDtypeOption, Module):
    """Long short-term memory (Hochreiter & Schmidhuber, 1997), PyTorch's ``nn.LSTM``
    equations and gate order (input, forget, cell, output)::

        i, f, g, o = split(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(c_t)

    Parameters
    ----------
    input_size, hidden_size : int
    num_layers : int
        Stacked layers; layer k > 0 reads layer k-1's hidden states.
    bias : bool
    batch_first : bool
        True (tileattn's convention, the default): (B, L, F) inputs and
        outputs. False: (L, B, F), PyTorch's default.
    dropout : float in [0, 1)
        On the outputs of every layer but the last, only with ``training=True``.
    dtype : float32 or float64
    seed : int, optional
        Seeds the weights (U(-1/sqrt(H), 1/sqrt(H)), as PyTorch) and dropout.
    compute_dtype : None or "bfloat16"
        "bfloat16" (float32 LSTMs): both products of every step (input and
        recurrent) on bf16 operands (weights, inputs and h rounded to
        bf16), float32 sums; gates and cell state stay float32. The
        products run in NumPy's BLAS.

    Parameters (arrays, PyTorch's names)
    ------------------------------------
    weight_ih_l{k} (4H, In_k), weight_hh_l{k} (4H, H), bias_ih_l{k} (4H,),
    bias_hh_l{k} (4H,), with In_0 = input_size and In_k = H.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = True, dropout: float = 0.0,
                 dtype: Any = np.float32, seed: Optional[int] = None,
                 compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        self._set_compute_dtype(compute_dtype, self.dtype)
        self.input_size = positive_int("input_size", input_size)
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.num_layers = positive_int("num_layers", num_layers)
        self.bias = flag("bias", bias)
        self.batch_first = flag("batch_first", batch_first)
        self.dropout = dropout_rate(dropout)
        self.seed = check_seed(seed)
        init_seq, drop_seq = np.random.SeedSequence(self.seed).spawn(2)
        rng = np.random.default_rng(init_seq)
        self._dropout_rng = np.random.default_rng(drop_seq)
        h = self.hidden_size
        a = 1.0 / math.sqrt(h)
        # All layers at once first: num_layers=10**19 would otherwise loop
        # for ever on small layers instead of raising MemoryError.
        check_fits("LSTM parameters", (self.num_layers, 4 * h, max(self.input_size, h) + h + 2),
                   8)
        for k in range(self.num_layers):
            n_in = self.input_size if k == 0 else h
            # Drawn in float64: the size check is of that draw.
            check_fits(f"weight_ih_l{k}", (4 * h, max(n_in, h)), 8)
            charge("LSTM", (4 * h, n_in + h + 2 * self.bias))
            self.register_parameter(f"weight_ih_l{k}", rng.uniform(-a, a, (4 * h, n_in)))
            self.register_parameter(f"weight_hh_l{k}", rng.uniform(-a, a, (4 * h, h)))
            self.register_parameter(f"bias_ih_l{k}", rng.uniform(-a, a, 4 * h) if bias else None)
            self.register_parameter(f"bias_hh_l{k}", rng.uniform(-a, a, 4 * h) if bias else None)

    def _initial(self, hx: Any, b: int, batched: bool) -> Tuple[np.ndarray, np.ndarray]:
        shape = (self.num_layers, b, self.hidden_size)
        if hx is None:
            z = np.zeros(shape, self.dtype)
            return z, z.copy()
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise InvalidParameterError("hx: expected a pair (h_0, c_0) or None")
        out = []
        for name, v in zip(("h_0", "c_0"), hx):
            a = np.asarray(v)
            if a.dtype not in FLOAT_DTYPES:
                raise DTypeError(f"hx: {name}: expected a float array, got {a.dtype}")
            want = shape if batched else (self.num_layers, self.hidden_size)
            if a.shape != want:
                raise ShapeError(f"hx: {name}: expected shape {want} (num_layers, "
                                 f"{'B, ' if batched else ''}hidden_size), got {a.shape}")
            out.append(np.array(a if batched else a[:, None], dtype=self.dtype, copy=True))
        return out[0], out[1]

    def forward(self, x: Any, hx: Any = None, *,
                training: bool = False) -> Tuple[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Run the LSTM over a sequence.

        Parameters
        ----------
        x : (B, L, input_size) (batch_first), (L, B, input_size) otherwise,
            or unbatched (L, input_size)
        hx : (h_0, c_0), each (num_layers, B, hidden_size) (unbatched:
            (num_layers, hidden_size)), optional; zeros by default
        training : bool
            Apply the between-layer dropout (only then).

        Returns
        -------
        output : (B, L, hidden_size) (or (L, B, ...) / (L, ...)): the last
            layer's h_t for every t, in x's dtype
        (h_n, c_n) : each (num_layers, B, hidden_size) (unbatched
            (num_layers, hidden_size)): the final states of every layer
        """
        a = float_array(x, "x")
        if a.ndim not in (2, 3) or a.shape[-1] != self.input_size:
            order = "B, L" if self.batch_first else "L, B"
            raise ShapeError(f"x: expected ({order}, {self.input_size}) or unbatched "
                             f"(L, {self.input_size}), got shape {a.shape}")
        p = self.dropout if flag("training", training) else 0.0
        batched = a.ndim == 3
        if a.shape[1 if batched and self.batch_first else 0] == 0:
            raise ShapeError(f"x: expected at least one time step, got shape {a.shape}")
        # Time-major (L, B, F) inside: step t reads one contiguous (B, 4H) block.
        if not batched:
            seq = a[:, None, :]
        else:
            seq = a.transpose(1, 0, 2) if self.batch_first else a
        seq = np.ascontiguousarray(seq, dtype=self.dtype)
        length, b = seq.shape[0], seq.shape[1]
        h0, c0 = self._initial(hx, b, batched)
        h_n, c_n = np.empty_like(h0), np.empty_like(c0)
        for k in range(self.num_layers):
            seq = self._layer(k, seq, h0[k], c0[k], h_n[k], c_n[k])
            if p > 0.0 and k < self.num_layers - 1:
                dropout_(seq, p, self._dropout_rng)
        if not batched:
            out, states = seq[:, 0], (h_n[:, 0], c_n[:, 0])
        else:
            out, states = (seq.transpose(1, 0, 2) if self.batch_first else seq), (h_n, c_n)
        dt = a.dtype
        return (np.ascontiguousarray(out, dtype=dt),
                (states[0].astype(dt, copy=False), states[1].astype(dt, copy=False)))

    def _layer(self, k: int, seq: np.ndarray, h0: np.ndarray, c0: np.ndarray,
               h_n: np.ndarray, c_n: np.ndarray) -> np.ndarray:
        """One layer over time-major seq (L, B, In) -> (L, B, H); writes the
        final states into h_n, c_n."""
        length, b, n_in = seq.shape
        hs = self.hidden_size
        w_ih: np.ndarray = self._params[f"weight_ih_l{k}"]
        w_hh: np.ndarray = self._params[f"weight_hh_l{k}"]
        b_ih: Optional[np.ndarray] = self._params[f"bias_ih_l{k}"]
        b_hh: Optional[np.ndarray] = self._params[f"bias_hh_l{k}"]
        def operand(a: np.ndarray) -> np.ndarray:
            return bf16_values(a) if self.bf16 else a

        w_ih, w_hh = operand(w_ih), operand(w_hh)
        # All time steps' input projections in one GEMM, both biases folded in.
        pre = (operand(seq.reshape(length * b, n_in)) @ w_ih.T).reshape(length, b, 4 * hs)
        if b_ih is not None and b_hh is not None:
            pre += b_ih + b_hh
        out = np.empty((length, b, hs), self.dtype)
        gates = np.empty((b, 4 * hs), self.dtype)
        ig = np.empty((b, hs), self.dtype)
        w_hh_t = w_hh.T
        # All four gates in one tanh: sigmoid(z) = 1/2 + tanh(z/2)/2 for i, f, o,
        # tanh(z) for g; per-column scale, then per-column affine map.
        half = np.full(4 * hs, 0.5, self.dtype)
        half[2 * hs:3 * hs] = 1.0
        shift = np.full(4 * hs, 0.5, self.dtype)
        shift[2 * hs:3 * hs] = 0.0
        h, c = h0, c0.copy()
        for t in range(length):
            np.matmul(operand(h), w_hh_t, out=gates)
            gates += pre[t]
            gates *= half
            np.tanh(gates, out=gates)
            gates *= half
            gates += shift                         # sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
            g = gates[:, 2 * hs:3 * hs]
            c *= gates[:, hs:2 * hs]
            np.multiply(gates[:, :hs], g, out=ig)
            c += ig
            h = out[t]
            np.tanh(c, out=h)
            h *= gates[:, 3 * hs:]
        h_n[...] = h
        c_n[...] = c
        return out

    def get_config(self) -> Dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.bias,
                "batch_first": self.batch_first, "dropout": self.dropout,
                "dtype": self.dtype.name, "seed": self.seed,
                "compute_dtype": self.compute_dtype_option}

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}" + self._compute_dtype_repr())


__all__: List[str] = ["LSTM"]
