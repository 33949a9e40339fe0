"""Parameter arrays are read-only outside the module that owns them.

Why: a module keeps copies derived from its weights (``Linear`` keeps its
weight packed in the layout the GEMM streams) and NumPy cannot tell cheaply
that an array was edited in place. An edit the module did not see would
leave those copies stale and the results silently wrong. So a module hands
out its parameters with ``writeable=False``, and every writer goes through
the module, which then knows:

- ``module.weight = w`` and ``load_state_dict`` copy into the arrays;
- an optimiser (``tileattn.optim``) unlocks the arrays it was given for the
  step, then tells their owners.

An in-place edit by hand (``m.weight[:] = 0``) raises NumPy's "assignment
destination is read-only". Each module counts its changes (``version``):
what is derived from its parameters remembers the version it was made at.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional

import numpy as np

if TYPE_CHECKING:
    from .module import Module

# id(parameter array) -> the module that owns it. Checked by identity on
# lookup (an id may be reused once its array is gone).
_OWNERS: "weakref.WeakValueDictionary[int, Module]" = weakref.WeakValueDictionary()


def adopt(module: "Module", array: np.ndarray) -> np.ndarray:
    """Make ``array`` one of ``module``'s parameters: read-only from now on."""
    array.flags.writeable = False
    _OWNERS[id(array)] = module
    return array


def owner_of(array: np.ndarray) -> Optional["Module"]:
    """The module whose parameter ``array`` is, or None."""
    module = _OWNERS.get(id(array))
    if module is not None and any(p is array for p in module._params.values()):
        return module
    return None


@contextmanager
def updating(arrays: Iterable[np.ndarray]) -> Iterator[None]:
    """Unlock the module parameters among ``arrays`` for the body, lock them
    again after it, and tell each owner its parameters changed (also when
    the body raised part-way: some may have been written)."""
    unlocked: List[np.ndarray] = []
    owners: Dict[int, "Module"] = {}
    try:
        for a in arrays:
            module = owner_of(a)
            if module is not None and not a.flags.writeable:
                a.flags.writeable = True
                unlocked.append(a)
                owners[id(module)] = module
        yield
    finally:
        for a in unlocked:
            a.flags.writeable = False
        for module in owners.values():
            module._parameters_changed()
