"""Optimisers that update NumPy parameter arrays in place, with PyTorch's
formulas (``torch.optim.SGD`` and ``torch.optim.AdamW``).

Parameters are named, so a module's ``named_parameters()`` and a ``grads``
mapping with the same names connect directly::

    opt = tileattn.optim.AdamW(model.named_parameters(), lr=1e-3)
    ...
    opt.step(grads)          # {name: gradient array}; missing names are skipped

A plain dict ``{name: array}`` or a list of arrays (named "0", "1", ...) works
too; with a list, ``step`` also takes the gradients as a list in the same order.
So does ``model.parameters()``, as in PyTorch.

A module's parameters are read-only outside it (its packed weights would go
stale otherwise): the optimiser unlocks them for each step and then tells
the module, which repacks before its next call. Arrays of your own must be
writeable.

Given a module itself, the optimiser reads the gradients its ``backward``
accumulated, so ``step()`` and ``zero_grad()`` need no arguments::

    opt = tileattn.optim.AdamW(model, lr=1e-3)
    model(x, training=True); model.backward(dy)
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _parameters
from ._errors import DTypeError, FrozenModuleError, InvalidParameterError, ShapeError
from .module import Module

Params = Union[Module, Mapping[str, np.ndarray], Iterable[Tuple[str, np.ndarray]],
               Iterable[np.ndarray]]
GradsArg = Union[Mapping[str, Optional[np.ndarray]], Sequence[Optional[np.ndarray]]]

__all__ = ["Optimizer", "SGD", "AdamW"]


def _real(value: Any, name: str, *, low: float = 0.0, high: float = math.inf,
          open_high: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(f"{name}: expected a real number, got {value!r}")
    x = float(value)
    ok = low <= x and (x < high if open_high else x <= high)
    if not ok or math.isnan(x):
        bound = f"[{low}, {high})" if open_high else f"[{low}, {high}]"
        raise InvalidParameterError(f"{name}: expected a number in {bound}, got {x}")
    return x


def _not_iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return True
    return isinstance(value, (str, bytes, np.ndarray))


def _named(params: Params) -> List[Tuple[str, np.ndarray]]:
    if isinstance(params, Mapping):
        items = list(params.items())
    elif _not_iterable(params):
        raise InvalidParameterError(
            f"params: expected a Module, a mapping name -> array, (name, array) pairs or a "
            f"list of arrays, got {type(params).__name__}")
    else:
        items = []
        for i, entry in enumerate(params):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                items.append(entry)
            else:
                items.append((str(i), entry))
    if not items:
        raise InvalidParameterError("params: the optimiser got no parameters")
    _refuse_frozen_owners(items)     # first: a frozen module's weights read as copies
    seen = set()
    for name, p in items:
        if not isinstance(p, np.ndarray):
            raise InvalidParameterError(
                f"params: parameter {name!r} is a {type(p).__name__}, expected a numpy array "
                f"(it is updated in place)"
            )
        if p.dtype.kind != "f":
            raise DTypeError(f"params: parameter {name!r} has dtype {p.dtype}, expected a float")
        if not p.flags.writeable and _parameters.owner_of(p) is None:
            raise InvalidParameterError(
                f"params: parameter {name!r} is read-only (and no module's parameter)")
        if name in seen:
            raise InvalidParameterError(f"params: the name {name!r} appears twice")
        seen.add(name)
    return items


def _refuse_frozen_owners(items: Sequence[Tuple[str, Any]]) -> None:
    """A parameter of a module frozen (now, or since the optimiser was
    built) is not updated: a step would change its biases and norms but
    not its packed weights."""
    for name, p in items:
        if isinstance(p, np.ndarray):
            for owner in _parameters.owners_of(p):
                if owner.frozen:
                    raise FrozenModuleError(
                        f"params: parameter {name!r} belongs to a frozen {type(owner).__name__} "
                        f"(inference-only): it is not trained")


class Optimizer:
    """Base class: named parameters, per-parameter state, ``step(grads)``."""

    def __init__(self, params: Params) -> None:
        # A module: its parameters, and its gradients when step() gets none.
        self.module: Optional[Module] = params if isinstance(params, Module) else None
        if self.module is not None and self.module.frozen:
            raise FrozenModuleError(
                f"params: the {type(params).__name__} is frozen (inference-only, its weights "
                f"held packed): there are no master weights to update")
        named = params.named_parameters() if isinstance(params, Module) else params
        self.params: List[Tuple[str, np.ndarray]] = _named(named)
        self.state: Dict[str, Dict[str, Any]] = {}

    def _own_module(self, what: str) -> Module:
        if self.module is None:
            raise InvalidParameterError(
                f"{what}: the optimiser was built from parameters, not a module, so it has "
                f"no gradients of its own; pass grads to step(), or build it from the module")
        return self.module

    def zero_grad(self) -> None:
        """Reset the module's gradients (an optimiser built from a module)."""
        self._own_module("zero_grad").zero_grad()

    def _pairs(self, grads: Optional[GradsArg]) -> List[Tuple[str, np.ndarray, np.ndarray]]:
        """(name, param, grad) for each parameter that has a gradient."""
        if grads is None:
            grads = self._own_module("grads").grads
        if isinstance(grads, Mapping):
            unknown = set(grads) - {n for n, _ in self.params}
            if unknown:
                raise InvalidParameterError(
                    f"grads: no parameter is named {sorted(map(repr, unknown))}"
                )
            looked_up = [grads.get(n) for n, _ in self.params]
        elif _not_iterable(grads):
            raise InvalidParameterError(
                f"grads: expected a mapping name -> gradient or a list of gradients, got "
                f"{type(grads).__name__}")
        else:
            looked_up = list(grads)
            if len(looked_up) != len(self.params):
                raise ShapeError(
                    f"grads: expected {len(self.params)} gradients (one per parameter), "
                    f"got {len(looked_up)}"
                )
        out = []
        for (name, p), g in zip(self.params, looked_up):
            if g is None:
                continue
            g = np.asarray(g)
            if g.shape != p.shape:
                raise ShapeError(
                    f"grads: gradient of {name!r} has shape {g.shape}, the parameter {p.shape}"
                )
            if g.dtype.kind != "f":
                raise DTypeError(f"grads: gradient of {name!r} has dtype {g.dtype}, expected a float")
            out.append((name, p, g.astype(p.dtype, copy=False)))
        return out

    def step(self, grads: Optional[GradsArg] = None) -> None:
        """Update the parameters in place from ``grads`` (default: the
        module's ``grads``, when built from a module)."""
        _refuse_frozen_owners(self.params)
        pairs = self._pairs(grads)
        with _parameters.updating(p for _, p, _ in pairs):
            self._update(pairs)

    def _update(self, pairs: List[Tuple[str, np.ndarray, np.ndarray]]) -> None:
        """One step on (name, parameter, gradient) triples, in place."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """Copies of the per-parameter state (e.g. to save a checkpoint)."""
        return {name: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
                for name, st in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore per-parameter state from ``state_dict()``'s output."""
        if not isinstance(state, Mapping) or not all(isinstance(v, Mapping)
                                                      for v in state.values()):
            raise InvalidParameterError(
                f"state: expected a mapping name -> mapping (an optimiser's state_dict()), "
                f"got {type(state).__name__}")
        names = {n for n, _ in self.params}
        unknown = set(state) - names
        if unknown:
            raise InvalidParameterError(f"state: no parameter is named {sorted(map(repr, unknown))}")
        self.state = {name: {k: (np.array(v) if isinstance(v, np.ndarray) else v)
                             for k, v in st.items()} for name, st in state.items()}


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    With ``g = grad + weight_decay * p``: if ``momentum`` is nonzero,
    ``buf = g`` on the first step and ``buf = momentum * buf + (1 - dampening) * g``
    after, and ``g = g + momentum * buf`` (``nesterov``) or ``g = buf``;
    then ``p -= lr * g``.
    """

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        super().__init__(params)
        self.lr = _real(lr, "lr")
        self.momentum = _real(momentum, "momentum")
        self.dampening = _real(dampening, "dampening")
        self.weight_decay = _real(weight_decay, "weight_decay")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise InvalidParameterError(f"nesterov: expected a bool, got {nesterov!r}")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise InvalidParameterError(
                "nesterov: needs momentum > 0 and dampening = 0 "
                f"(got momentum={self.momentum}, dampening={self.dampening})"
            )
        self.nesterov = bool(nesterov)

    def _update(self, pairs: List[Tuple[str, np.ndarray, np.ndarray]]) -> None:
        for name, p, g in pairs:
            if self.weight_decay:
                g = g + p * p.dtype.type(self.weight_decay)
            if self.momentum:
                st = self.state.setdefault(name, {})
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = np.array(g, copy=True)
                else:
                    buf *= p.dtype.type(self.momentum)
                    buf += g * p.dtype.type(1.0 - self.dampening)
                g = g + buf * p.dtype.type(self.momentum) if self.nesterov else buf
            p -= g * p.dtype.type(self.lr)


class AdamW(Optimizer):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Per step ``t``: ``p *= 1 - lr * weight_decay``; ``m += (1 - beta1) * (g - m)``;
    ``v = beta2 * v + (1 - beta2) * g^2`` (with ``amsgrad``, the running maximum
    of ``v`` is used below); ``p -= lr / (1 - beta1^t) * m / (sqrt(v) /
    sqrt(1 - beta2^t) + eps)``.
    """

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(params)
        self.lr = _real(lr, "lr")
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise InvalidParameterError(f"betas: expected a pair (beta1, beta2), got {betas!r}") from None
        self.betas = (_real(b1, "betas[0]", high=1.0, open_high=True),
                      _real(b2, "betas[1]", high=1.0, open_high=True))
        self.eps = _real(eps, "eps")
        self.weight_decay = _real(weight_decay, "weight_decay")
        if not isinstance(amsgrad, (bool, np.bool_)):
            raise InvalidParameterError(f"amsgrad: expected a bool, got {amsgrad!r}")
        self.amsgrad = bool(amsgrad)

    def _update(self, pairs: List[Tuple[str, np.ndarray, np.ndarray]]) -> None:
        beta1, beta2 = self.betas
        for name, p, g in pairs:
            t = p.dtype.type
            st = self.state.setdefault(name, {})
            if not st:
                st["step"] = 0
                st["exp_avg"] = np.zeros_like(p)
                st["exp_avg_sq"] = np.zeros_like(p)
                if self.amsgrad:
                    st["max_exp_avg_sq"] = np.zeros_like(p)
            st["step"] += 1
            step = st["step"]
            m, v = st["exp_avg"], st["exp_avg_sq"]
            p *= t(1.0 - self.lr * self.weight_decay)
            m += (g - m) * t(1.0 - beta1)
            v *= t(beta2)
            v += g * g * t(1.0 - beta2)
            bias1 = 1.0 - beta1**step
            bias2_sqrt = math.sqrt(1.0 - beta2**step)
            if self.amsgrad:
                vmax = st["max_exp_avg_sq"]
                np.maximum(vmax, v, out=vmax)
                v = vmax
            denom = np.sqrt(v) / t(bias2_sqrt) + t(self.eps)
            p -= m / denom * t(self.lr / bias1)
