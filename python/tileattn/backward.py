"""The backward of scaled dot-product attention: gradients of q, k, v (and of
a float attn_mask) from the forward's output and log-sum-exp, computed by the
fused C++ kernel without ever forming the (Lq, Lk) weights."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _call
from ._call_checks import ArrayLike, Window, as_input
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._overlap import refuse_shared_outputs
from ._validate import flag, shape_str

Grads = Union[Tuple[np.ndarray, np.ndarray, np.ndarray],
              Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _check_like(a: ArrayLike, name: str, shape: Tuple[int, ...], dtype: np.dtype[Any],
                what: str) -> np.ndarray:
    arr = as_input(a, name)
    if arr.shape != shape:
        raise ShapeError(f"{name}: expected shape {shape} ({what}), got {shape_str(arr.shape)}")
    if arr.dtype != dtype:
        raise DTypeError(f"{name}: expected dtype {dtype} (q's dtype), got {arr.dtype}")
    return arr


def _check_lse(lse: ArrayLike, shape: Tuple[int, ...]) -> np.ndarray:
    lse_a = lse if isinstance(lse, np.ndarray) else np.asarray(lse)
    if lse_a.dtype.kind != "f":
        raise DTypeError(f"lse: expected a float array (the forward's lse), got {lse_a.dtype}")
    if lse_a.shape != shape:
        raise ShapeError(
            f"lse: expected shape {shape} (the forward's lse, one value per query "
            f"row), got {shape_str(lse_a.shape)}"
        )
    return lse_a


def _check_grads_out(grads_out: Any, like: Tuple[np.ndarray, ...]) -> Tuple[Any, ...]:
    if grads_out is None:
        return (None, None, None)
    if not isinstance(grads_out, (tuple, list)) or len(grads_out) != 3:
        raise InvalidParameterError(
            f"grads_out: expected a tuple (dq, dk, dv) of arrays, got {type(grads_out).__name__}"
        )
    for name, u, a in zip(("dq", "dk", "dv"), grads_out, like):
        if not isinstance(u, np.ndarray):
            raise InvalidParameterError(
                f"grads_out: {name} must be a numpy array, got {type(u).__name__}"
            )
        if u.shape != a.shape:
            raise ShapeError(f"grads_out: {name} must have shape {a.shape}, got {shape_str(u.shape)}")
        if u.dtype != a.dtype:
            raise DTypeError(f"grads_out: {name} must have dtype {a.dtype}, got {u.dtype}")
        if not u.flags.writeable:
            raise InvalidParameterError(f"grads_out: {name} is read-only")
    refuse_shared_outputs("grads_out", list(zip(("dq", "dk", "dv"), grads_out)))
    return tuple(grads_out)


def scaled_dot_product_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    *,
    attn_mask: Optional[ArrayLike] = None,
    key_padding_mask: Optional[ArrayLike] = None,
    is_causal: bool = False,
    window: Window = None,
    causal_alignment: str = "bottom_right",
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    return_mask_grad: bool = False,
    grads_out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
) -> Grads:
    """Gradients of ``scaled_dot_product_attention`` with respect to its inputs.

    Pass the incoming gradient, the forward's inputs, its output and the
    log-sum-exp it returned with ``return_lse=True``, and the same options the
    forward was called with::

        out, lse = tileattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         return_lse=True)
        dq, dk, dv = tileattn.scaled_dot_product_attention_backward(
            dout, q, k, v, out, lse, is_causal=True)

    The weights are recomputed block by block from ``q``, ``k`` and ``lse``
    (the (Lq, Lk) matrix is never formed); key blocks that the causal mask or
    the window hide are skipped as in the forward.

    Parameters
    ----------
    dout : array (B, Hq, Lq, Dv) or unbatched (Hq, Lq, Dv)
        Gradient of the loss with respect to the output.
    q, k, v : arrays (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)
        The forward's inputs (unbatched without the leading axis).
    out : array (B, Hq, Lq, Dv)
        The forward's output (after dropout); only read (it may be read-only).
    lse : array (B, Hq, Lq)
        The forward's log-sum-exp (``return_lse=True``, float64).
    attn_mask, key_padding_mask, is_causal, window, causal_alignment, scale
        As in the forward; they must be the ones it used.
    dropout_p, seed : float, int
        As in the forward: the dropout mask is regenerated from the seed, so
        ``seed`` is required when ``dropout_p > 0``.
    return_mask_grad : bool
        Also return the gradient of a float ``attn_mask``, summed over the
        axes it was broadcast along (so it has the mask's own shape and
        dtype). This materialises a (B, Hq, Lq, Lk) buffer while it computes.
    grads_out : (dq, dk, dv) arrays, optional
        Preallocated outputs shaped and typed like q, k, v (they may be
        strided views, e.g. into the gradient of a fused QKV projection);
        they are overwritten and returned. Two of them sharing an element
        raise ``InvalidParameterError`` naming both (views of one fused
        buffer that share none are fine). One that overlaps an input (q,
        k, v, out, dout, lse or a mask) is computed into a temporary and
        copied in at the end, so the result is as if it did not overlap.

    Returns
    -------
    dq : array (B, Hq, Lq, D)
    dk : array (B, Hkv, Lk, D)
        With grouped-query attention, the sum over the query heads that share
        each key/value head (likewise ``dv``).
    dv : array (B, Hkv, Lk, Dv)
    dmask : array of attn_mask's shape, only with ``return_mask_grad=True``

    Gradients have the inputs' dtype (float16 is computed in float32). Rows
    that see no key contribute zero gradient; keys no query sees get zero.
    Results are bitwise identical for any number of threads.
    """
    call = _call.describe(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                          is_causal=is_causal, window=window,
                          causal_alignment=causal_alignment, scale=scale,
                          dropout_p=dropout_p, seed=seed, seed_from_forward=True)
    x = call.inputs
    out_a = _check_like(out, "out", x.out_shape, x.in_dtype, "the forward's output")
    dout_a = _check_like(dout, "dout", x.out_shape, x.in_dtype, "like the forward's output")
    lse_a = _check_lse(lse, x.out_shape[:-1])
    flag("return_mask_grad", return_mask_grad)
    if return_mask_grad and (call.mask is None or call.mask.dtype == np.bool_):
        raise InvalidParameterError(
            "return_mask_grad: only a float attn_mask has a gradient; "
            + ("none was given" if call.mask is None else "this one is bool")
        )
    user_out = _check_grads_out(grads_out, (x.q, x.k, x.v))
    grads = _call.backward(call, dout_a, out_a, lse_a, return_mask_grad=return_mask_grad,
                           grads_out=user_out)
    return tuple(grads)  # type: ignore[return-value]
