"""Which caller arrays may overlap in memory, for the checks that keep an
output from silently clobbering an input (or another output) it is computed
from.

The first test is NumPy's bounds test (``np.may_share_memory``): cheap, and
never wrong when it says "apart". Where an overlap only costs a copy (the
output is computed into a temporary and copied in at the end) that test is
all that is needed. Where an overlap must be refused (two outputs of one
call), bounds that overlap are tested exactly, with a bounded amount of
work, so that interleaved views of one buffer (dq, dk, dv in one fused
(B, L, 3, H, D) gradient) that share no element still pass.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ._errors import InvalidParameterError

# Enough for the exact test to settle any slice of a strided view; past it
# NumPy gives up (TooHardError) and the pair is treated as overlapping.
_EXACT_WORK = 100_000
# np.exceptions appeared in NumPy 1.25; older releases keep it at the top.
_TOO_HARD: Any = getattr(getattr(np, "exceptions", np), "TooHardError")
# NumPy's stub allows only max_work -1 or 0, though any bound is accepted.
_shares_memory: Any = np.shares_memory

Named = Sequence[Tuple[str, Optional[np.ndarray]]]


def may_overlap(a: np.ndarray, others: Sequence[Optional[np.ndarray]]) -> bool:
    """Whether a's memory bounds meet any of `others` (None entries skipped)."""
    return any(o is not None and np.may_share_memory(a, o) for o in others)


def share_elements(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b have an element in common (True when undecidable)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(_shares_memory(a, b, max_work=_EXACT_WORK))
    except _TOO_HARD:
        return True


def refuse_shared_outputs(what: str, outputs: Named) -> None:
    """InvalidParameterError naming the first two of `outputs` that share
    memory: no order of writing makes two results in one place meaningful."""
    present = [(n, a) for n, a in outputs if a is not None]
    for i, (name_a, a) in enumerate(present):
        for name_b, b in present[i + 1:]:
            if share_elements(a, b):
                raise InvalidParameterError(
                    f"{what}: {name_a} and {name_b} share memory; each output needs "
                    f"its own array")
