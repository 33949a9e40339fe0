"""Loading a state dict into a module: names, checks, and the copy.

A state dict maps dotted names (``out_proj.weight``) to arrays. Loading
accepts the foreign names a layer knows (``_convert_state_dict``, e.g.
PyTorch's packed ``in_proj_weight``), checks every key and shape before
writing anything, and copies the values *into* the module's arrays, so
packed views and what is derived from them stay consistent (a frozen
module's weights, held only packed, are packed again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NamedTuple

import numpy as np

from . import _parameters
from ._frozen import FrozenParameter, PackedRows
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._validate import is_bfloat16, shape_str

if TYPE_CHECKING:
    from .module import Module


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(strict=False)`` skipped."""

    missing_keys: List[str]
    unexpected_keys: List[str]


def as_value(key: str, value: Any) -> np.ndarray:
    """A state-dict value as an array (torch tensors, lists, ... via np.asarray)."""
    try:
        a = np.asarray(value)
    except Exception as e:  # e.g. a torch tensor that requires grad
        raise DTypeError(f"state_dict[{key!r}]: cannot convert to a NumPy array ({e})") from None
    if a.dtype.kind not in "fiub" and not is_bfloat16(a.dtype):
        raise DTypeError(f"state_dict[{key!r}]: expected real numbers, got dtype {a.dtype}")
    return a


def canonical(module: "Module", sd: Mapping[str, Any]) -> Dict[str, Any]:
    """sd with every module's foreign names converted, children recursively."""
    own = module._convert_state_dict(dict(sd))
    for child in module._modules.values():
        if child is not None and child.inline_names:
            own = child._convert_state_dict(own)
    children = dict(module.named_children())
    out: Dict[str, Any] = {}
    parts: Dict[str, Dict[str, Any]] = {}
    for key, value in own.items():
        head, _, rest = key.partition(".")
        if rest and head in children:
            parts.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    for head, part in parts.items():
        for key, value in canonical(children[head], part).items():
            out[f"{head}.{key}"] = value
    return out


def load(module: "Module", state_dict: Mapping[str, Any], strict: Any) -> IncompatibleKeys:
    """``module.load_state_dict(state_dict, strict)`` (documented there)."""
    if not isinstance(state_dict, Mapping):
        raise InvalidParameterError(
            f"state_dict: expected a mapping of name -> array, got {type(state_dict).__name__}")
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise InvalidParameterError(
            f"state_dict: keys must be parameter names (str), got {bad_keys[0]!r}")
    if not isinstance(strict, (bool, np.bool_)):
        raise InvalidParameterError(f"strict: expected a bool, got {strict!r}")
    # A converted foreign state dict (``keras_state_dict``'s) may know more
    # than its flattened shapes say, e.g. the heads: it refuses a module
    # it does not fit.
    check_target = getattr(state_dict, "check_target", None)
    if callable(check_target):
        check_target(module)
    sd = canonical(module, state_dict)
    slots = {name: (owner, own_name, p)
             for name, owner, own_name, p in module._parameter_slots()}
    own = {name: p for name, (_, _, p) in slots.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    values = {k: as_value(k, sd[k]) for k in own if k in sd}
    misshaped = [f"{k}: expected {shape_str(own[k].shape)}, got {shape_str(v.shape)}"
                 for k, v in values.items() if v.shape != own[k].shape]
    key_problem = strict and (missing or unexpected)
    if key_problem or misshaped:
        lines = [f"load_state_dict into {type(module).__name__} failed:"]
        if strict and missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if strict and unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped))
        err = InvalidParameterError if key_problem else ShapeError
        raise err("\n".join(lines))
    # A frozen module's weights (row ranges of packed stores): each store
    # is packed anew with all its new rows first, and only swapped in once
    # every store is, so a failure here (memory, Ctrl-C) changes nothing.
    rows: Dict[int, Dict[int, np.ndarray]] = {}
    stores: Dict[int, PackedRows] = {}
    for k, v in values.items():
        p = own[k]
        if isinstance(p, FrozenParameter):
            stores[id(p.store)] = p.store
            rows.setdefault(id(p.store), {})[p.start] = v
    repacked = {key: stores[key].repacked(r) for key, r in rows.items()}
    # updating() tells every module holding a parameter, once.
    with _parameters.updating(p for p in own.values() if isinstance(p, np.ndarray)):
        for key, packed in repacked.items():
            stores[key].commit(packed)
        for k, v in values.items():
            p = own[k]
            if isinstance(p, np.ndarray):
                np.copyto(p, v, casting="unsafe")
            else:
                slots[k][0]._parameters_changed()
    return IncompatibleKeys(missing if not strict else [], unexpected if not strict else [])
