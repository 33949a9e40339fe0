"""A bound on the parameters a module constructor may allocate, for
building a module from a config read out of an untrusted file.

``tileattn.load`` rebuilds a module from the config stored beside its
arrays; a crafted config (``embed_dim=10**6`` beside a few bytes of
arrays) would make the constructor allocate and fill gigabytes before the
arrays were found not to fit. The constructors that allocate parameters
(``Linear``, ``LayerNorm``, ``LSTM``: every module is built from them)
``charge`` each parameter's elements first; inside ``parameter_budget(n)``
a charge past n raises ``BudgetExceeded`` before the allocation. Outside
one (every ordinary construction) a charge does nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, List, Optional, Sequence

_remaining: ContextVar[Optional[List[int]]] = ContextVar("tileattn_parameter_budget",
                                                         default=None)


class BudgetExceeded(Exception):
    """A constructor asked for more parameter elements than the budget."""


@contextmanager
def parameter_budget(elements: int) -> Iterator[None]:
    """Constructors inside may allocate at most `elements` parameter elements."""
    token = _remaining.set([elements])
    try:
        yield
    finally:
        _remaining.reset(token)


def charge(what: str, *shapes: Sequence[int]) -> None:
    """Count parameters of `shapes` against the budget (if one is set)."""
    left = _remaining.get()
    if left is None:
        return
    n = sum(math.prod(int(s) for s in shape) for shape in shapes)
    if n > left[0]:
        raise BudgetExceeded(f"{what} needs {n} parameter elements, more than the "
                             f"{left[0]} left of the budget")
    left[0] -= n
