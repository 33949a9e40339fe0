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

# id(parameter array) -> weak references to the modules that hold it (more
# than one after copy.copy of a module: the copies share their arrays, and
# each keeps its own derived copies, so each must hear of a write). An
# entry goes when its array does (weakref.finalize in adopt).
_OWNERS: Dict[int, List["weakref.ref[Module]"]] = {}


def adopt(module: "Module", array: np.ndarray) -> np.ndarray:
    """Make ``array`` one of ``module``'s parameters: read-only from now on."""
    array.flags.writeable = False
    refs = _OWNERS.get(id(array))
    if refs is None:
        refs = _OWNERS[id(array)] = []
        weakref.finalize(array, _OWNERS.pop, id(array), None)
    refs[:] = [r for r in refs if r() is not None and r() is not module]
    refs.append(weakref.ref(module))
    return array


def owners_of(array: np.ndarray) -> List["Module"]:
    """The live modules whose parameter ``array`` is (checked by identity)."""
    found = []
    for ref in _OWNERS.get(id(array), ()):
        module = ref()
        if module is not None and any(p is array for p in module._params.values()):
            found.append(module)
    return found


def owner_of(array: np.ndarray) -> Optional["Module"]:
    """A module whose parameter ``array`` is, or None."""
    owners = owners_of(array)
    return owners[0] if owners else None


@contextmanager
def updating(arrays: Iterable[np.ndarray]) -> Iterator[None]:
    """Unlock the module parameters among ``arrays`` for the body, lock them
    again after it, and tell each owner its parameters changed (also when
    the body raised part-way: some may have been written)."""
    unlocked: List[np.ndarray] = []
    owners: Dict[int, "Module"] = {}
    try:
        for a in arrays:
            holders = owners_of(a)
            if holders and not a.flags.writeable:
                a.flags.writeable = True
                unlocked.append(a)
                owners.update((id(m), m) for m in holders)
        yield
    finally:
        for a in unlocked:
            a.flags.writeable = False
        for module in owners.values():
            module._parameters_changed()
