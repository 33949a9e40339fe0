"""One checked description of an attention call, built once at the edge.

``describe`` checks q, k, v, the masks, padding, key lengths and the scalar
options (every error names its argument), adds the batch axis the kernel
takes, and returns an ``AttentionCall``. ``forward`` and ``backward`` run the
kernels from it. The public functions (``scaled_dot_product_attention`` and
its backward) are ``describe`` plus one of those; a training forward that
keeps its ``AttentionCall`` hands it to ``backward`` as it is, so nothing
is checked, broadcast or re-batched twice.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import numpy as np

from . import _core
from ._call_checks import (
    DENSE_COPY_MIN_QUERIES,
    NATIVE,
    ArrayLike,
    Window,
    as_input,
    broadcast_attn_mask,
    check_key_lengths,
    check_key_padding,
    check_qkv,
    dropout_and_seed,
    kernel_array,
    dense_rows,
    kernel_can_write,
    prefix_lengths,
    scale_value,
    top_left_alignment,
    window_bounds,
)
from ._errors import InvalidParameterError
from ._memory import check_fits
from ._validate import bf16_products


# NamedTuples, not frozen dataclasses: a small call builds two of these, and
# a frozen dataclass's field-by-field __init__ cost ~3 us of its ~40.
class AttentionInputs(NamedTuple):
    """q, k, v checked, with what every pass derives from them."""

    q: np.ndarray  # as given (unbatched: 3-D)
    k: np.ndarray
    v: np.ndarray
    q4: np.ndarray  # with the batch axis, as the kernel takes them
    k4: np.ndarray
    v4: np.ndarray
    batched: bool
    in_dtype: np.dtype[Any]
    dtype: np.dtype[Any]  # the kernel's: float16 is computed in float32

    @property
    def scores_shape(self) -> tuple[int, int, int, int]:
        """(B, Hq, Lq, Lk), with B = 1 for unbatched inputs."""
        b, hq, lq, _ = self.q4.shape
        return b, hq, lq, self.k4.shape[2]

    @property
    def out_shape4(self) -> tuple[int, int, int, int]:
        """(B, Hq, Lq, Dv), with B = 1 for unbatched inputs."""
        b, hq, lq, _ = self.scores_shape
        return b, hq, lq, self.v4.shape[3]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output's shape as the caller sees it (no B when unbatched)."""
        return self.out_shape4 if self.batched else self.out_shape4[1:]

    def batch(self, a: np.ndarray) -> np.ndarray:
        """a with the batch axis the kernel takes (a view)."""
        return a if self.batched else a[np.newaxis]

    def unbatch(self, a: np.ndarray) -> np.ndarray:
        """A kernel result as the caller sees it (a view)."""
        return a if self.batched else a[0]


def check_inputs(q: ArrayLike, k: ArrayLike, v: ArrayLike) -> AttentionInputs:
    """Checks q, k, v (dtypes, ranks, matching shapes)."""
    qa, ka, va = as_input(q, "q"), as_input(k, "k"), as_input(v, "v")
    check_qkv(qa, ka, va)
    batched = qa.ndim == 4
    q4, k4, v4 = (a if batched else a[np.newaxis] for a in (qa, ka, va))
    dtype = qa.dtype if qa.dtype in NATIVE else np.dtype(np.float32)
    return AttentionInputs(qa, ka, va, q4, k4, v4, batched, qa.dtype, dtype)


class AttentionCall(NamedTuple):
    """Everything the kernels need of one call, checked and batched."""

    inputs: AttentionInputs
    mask: Optional[np.ndarray]  # broadcast to (B, Hq, Lq, Lk); bool or the compute dtype
    mask_given: Optional[np.ndarray]  # as the caller gave it (the mask gradient's shape)
    key_padding: Optional[np.ndarray]  # (B, Lk) bool, True = real token
    key_lengths: Optional[np.ndarray]  # (B,) int64
    window_left: int  # -1 = unbounded
    window_right: int
    top_left: bool  # the bounds align query i with key i (else the last with the last)
    scale: float
    dropout_p: float
    seed: int
    bf16: bool = False  # both products on bf16 operands (compute_dtype="bfloat16")

    def kernel_options(self, *, prefer_lengths: bool = False) -> _core.AttentionOptions:
        """The options as the core takes them. prefer_lengths: a padding
        mask of prefix form without window bounds goes as key lengths (the
        same keys, and the kernel stops reading at each sequence's end;
        with bounds the two differ, as lengths also move the diagonal)."""
        kpm, lengths = self.key_padding, self.key_lengths
        if (prefer_lengths and kpm is not None and lengths is None
                and self.window_left == -1 and self.window_right == -1):
            lengths = prefix_lengths(kpm)
            kpm = None if lengths is not None else kpm
        return _core.AttentionOptions(
            scale=self.scale, window_left=self.window_left, window_right=self.window_right,
            top_left=self.top_left, mask=self.mask, key_padding=kpm, key_lengths=lengths,
            dropout_p=self.dropout_p, seed=self.seed, bf16=self.bf16)


def describe(q: ArrayLike, k: ArrayLike, v: ArrayLike, *,
             attn_mask: Optional[ArrayLike] = None,
             key_padding_mask: Optional[ArrayLike] = None,
             key_lengths: Optional[ArrayLike] = None,
             is_causal: bool = False, window: Window = None,
             causal_alignment: str = "bottom_right", scale: Optional[float] = None,
             dropout_p: float = 0.0, seed: Optional[int] = None,
             seed_from_forward: bool = False, compute_dtype: Any = None) -> AttentionCall:
    """Checks one call's inputs and options, in the order errors are
    reported: q/k/v, window and is_causal, causal_alignment, scale, dropout_p and seed, the
    masks, key lengths. seed_from_forward: a backward regenerates the
    forward's dropout mask, so it needs the forward's seed (none is drawn).
    compute_dtype: None or "bfloat16" (float32 computations only), checked
    right after q/k/v."""
    inputs = check_inputs(q, k, v)
    bf16 = bf16_products(compute_dtype, inputs.dtype)
    b, _, _, lk = inputs.scores_shape
    left, right = window_bounds(window, is_causal)
    top_left = top_left_alignment(causal_alignment)
    scale_v = scale_value(scale, inputs.q.shape[-1])
    p, seed_v = dropout_and_seed(dropout_p, 0 if seed_from_forward and seed is None else seed)
    if seed_from_forward and p > 0 and seed is None:
        raise InvalidParameterError(
            "seed: the backward of dropout regenerates the forward's dropout mask, so pass "
            "the seed the forward used"
        )
    given = (attn_mask if attn_mask is None or isinstance(attn_mask, np.ndarray)
             else np.asarray(attn_mask))
    mask = None if given is None else broadcast_attn_mask(
        given, inputs.scores_shape, inputs.dtype, inputs.batched)
    kpm = None if key_padding_mask is None else check_key_padding(
        key_padding_mask, b, lk, inputs.batched)
    lengths = None if key_lengths is None else check_key_lengths(
        key_lengths, b, lk, inputs.batched)
    return AttentionCall(inputs, mask, given, kpm, lengths, left, right, top_left, scale_v, p,
                         seed_v, bf16)


def read_arrays(call: AttentionCall) -> Tuple[np.ndarray, ...]:
    """Every caller array the kernel reads: an output whose memory meets one
    of them is computed into a temporary and copied in after the kernel
    (the kernel would otherwise read values it has already overwritten)."""
    x = call.inputs
    extra = (call.mask_given, call.key_padding, call.key_lengths)
    return (x.q, x.k, x.v) + tuple(a for a in extra if a is not None)


def forward(call: AttentionCall, *, out: Optional[np.ndarray] = None,
            return_weights: bool = False, return_lse: bool = False) -> List[np.ndarray]:
    """Runs the forward: [out, weights (if asked), lse (if asked)], each as
    the caller sees it. out: a caller's array already checked (check_out)."""
    x = call.inputs
    b, hq, lq, lk = x.scores_shape
    # The weights first: when they cannot be had (MemoryError), nothing else
    # has been allocated or copied yet.
    if return_weights:
        check_fits("weights", (b, hq, lq, lk), x.dtype.itemsize)
    weights = np.zeros((b, hq, lq, lk), x.dtype) if return_weights else None
    q4, k4, v4 = (kernel_array(a, x.dtype) for a in (x.q4, x.k4, x.v4))
    if lq >= DENSE_COPY_MIN_QUERIES:
        k4, v4 = dense_rows(k4), dense_rows(v4)
    # Compute into `out` directly when we can; otherwise into a fresh array
    # (also when `out` overlaps an input: see read_arrays).
    direct = out is not None and kernel_can_write(out, x.dtype, read_arrays(call))
    result = x.batch(out) if direct and out is not None else np.empty(x.out_shape4, x.dtype)
    lse = np.full((b, hq, lq, 1), -np.inf, np.float64) if return_lse else None

    # Positional: keyword arguments cost a small call ~0.7 us to parse.
    _core.attention_forward(q4, k4, v4, result, call.kernel_options(prefer_lengths=True),
                            weights, lse)

    result = x.unbatch(result)
    if out is not None:
        if not direct:
            out[...] = result
        result = out  # (unbatched, direct: result was a view of it)
    elif result.dtype != x.in_dtype:
        result = result.astype(x.in_dtype)
    results = [result]
    if weights is not None:
        w = x.unbatch(weights)
        results.append(w if w.dtype == x.in_dtype else w.astype(x.in_dtype))
    if lse is not None:
        results.append(x.unbatch(lse)[..., 0])
    return results


def backward(call: AttentionCall, dout: np.ndarray, out: np.ndarray, lse: np.ndarray, *,
             return_mask_grad: bool = False,
             grads_out: Tuple[Any, ...] = (None, None, None)) -> List[np.ndarray]:
    """Runs the backward: [dq, dk, dv, dmask (if asked)]. dout, out, lse as
    the forward's caller saw them, already checked; grads_out checked (no
    two of them share memory)."""
    x = call.inputs
    b, hq, lq, lk = x.scores_shape
    dtype = x.dtype
    shapes = (x.q4.shape, x.k4.shape, x.v4.shape)
    # Every allocation's size first, so that MemoryError comes before any work.
    for name, shape, u in zip(("dq", "dk", "dv"), shapes, grads_out):
        if u is None or u.dtype != dtype:
            check_fits(name, shape, dtype.itemsize)
    if return_mask_grad:
        check_fits("mask gradient", (b, hq, lq, lk), dtype.itemsize)
    # The kernel only reads `out`, but the core takes it through the forward's
    # parameters, which want it writeable: a read-only one goes as a copy.
    o4 = x.batch(out) if out.flags.writeable else np.array(x.batch(out))
    q4, k4, v4, o4, g4 = (kernel_array(a, dtype) for a in (x.q4, x.k4, x.v4, o4,
                                                              x.batch(dout)))
    l4 = kernel_array(x.batch(lse)[..., np.newaxis], np.dtype(np.float64))
    inputs = read_arrays(call) + (out, dout, lse)
    # Write straight into the caller's arrays when the kernel can; one that
    # overlaps an input gets a temporary, copied in after the kernel.
    direct = [u is not None and kernel_can_write(u, dtype, inputs) for u in grads_out]
    dq, dk, dv = (x.batch(u) if ok and u is not None else np.empty(shape, dtype)
                  for u, ok, shape in zip(grads_out, direct, shapes))
    dscores = np.zeros((b, hq, lq, lk), dtype) if return_mask_grad else None

    _core.attention_backward(q4, k4, v4, o4, l4, g4, dq, dk, dv, call.kernel_options(),
                             dscores=dscores)

    grads = [x.unbatch(a) for a in (dq, dk, dv)]
    grads = [a if a.dtype == x.in_dtype else a.astype(x.in_dtype) for a in grads]
    for i, (u, ok) in enumerate(zip(grads_out, direct)):
        if u is not None and not ok:
            u[...] = grads[i]
        if u is not None:
            grads[i] = u
    if dscores is not None:
        assert call.mask_given is not None  # a float attn_mask (the caller checked)
        grads.append(unbroadcast(x.unbatch(dscores), call.mask_given.shape)
                     .astype(call.mask_given.dtype, copy=False))
    return grads


def unbroadcast(grad: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Sums grad over the axes along which an array of `shape` was broadcast."""
    lead = grad.ndim - len(shape)
    if lead:
        grad = grad.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)
