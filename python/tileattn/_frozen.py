"""Weights a frozen module keeps only packed.

A layer's weight matrix normally lives twice: the row-major parameter
(what training updates and the state dict shows) and its copy packed in
the layout the core's GEMM streams (``_core.pack_linear``), which a
forward reads. An inference service never trains, so ``Module.freeze()``
drops the row-major copy: each weight is then held once, packed (float32:
half the memory it took; bf16 products: the bf16 copy only, a third).

``PackedRows`` is that one copy of a matrix. A parameter of a frozen
module is a ``FrozenParameter``, a range of its rows: all of them for a
``Linear``; a third of the fused Q/K/V matrix for each input projection of
an attention. Reading one (``module.weight``, ``state_dict()``) unpacks
a read-only copy, bit for bit what was packed (for bf16 products, the
rounded values widened to float32); writing one (``load_state_dict``,
assignment) packs the matrix again.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core


class PackedRows:
    """A weight matrix (rows, in_features) held only packed for the core's
    GEMM: bf16 pairs when ``bf16``, else its own dtype."""

    def __init__(self, weight: np.ndarray, bf16: bool) -> None:
        self.bf16 = bf16
        self.shape: Tuple[int, int] = (int(weight.shape[0]), int(weight.shape[1]))
        self.dtype = weight.dtype
        self.generation = 0      # counts writes: packs of row ranges follow it
        self._packed = _core.pack_linear(weight, bf16=bf16)

    def packed(self) -> "_core.PackedLinear":
        """The packed matrix for the active ISA path (packed again from
        itself after another path became active: the layouts differ)."""
        if self._packed.isa != _core.isa():
            self._packed = _core.pack_linear(_core.unpack_linear(self._packed), bf16=self.bf16)
        return self._packed

    def values(self) -> np.ndarray:
        """The whole matrix, row-major (a new array)."""
        return _core.unpack_linear(self._packed)

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Rows [start, start + len(rows)) become ``rows`` (cast to the
        dtype); the matrix is packed again."""
        w = self.values()
        np.copyto(w[start:start + rows.shape[0]], rows, casting="unsafe")
        self._packed = _core.pack_linear(w, bf16=self.bf16)
        self.generation += 1

    @property
    def nbytes(self) -> int:
        return int(self._packed.nbytes)

    # Pickled as the values (the packed layout belongs to one ISA path).
    def __getstate__(self) -> Dict[str, Any]:
        return {"weight": self.values(), "bf16": self.bf16}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["weight"], state["bf16"])  # type: ignore[misc]


class FrozenParameter:
    """Rows [start, stop) of a ``PackedRows``: one parameter of a frozen
    module (``shape`` and ``dtype`` as the array it replaced)."""

    def __init__(self, store: PackedRows, start: int, stop: int) -> None:
        self.store, self.start, self.stop = store, start, stop
        self.shape: Tuple[int, int] = (stop - start, store.shape[1])
        self.dtype = store.dtype
        self._slice: Optional[Tuple[Any, "_core.PackedLinear"]] = None

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def whole(self) -> bool:
        """Whether these rows are the whole matrix."""
        return self.start == 0 and self.stop == self.store.shape[0]

    def value(self) -> np.ndarray:
        """The rows as a read-only array (unpacked: a copy)."""
        w = self.store.values()
        rows = w if self.whole else np.ascontiguousarray(w[self.start:self.stop])
        rows.flags.writeable = False
        return rows

    def write(self, values: np.ndarray) -> None:
        self.store.write_rows(self.start, values)

    def packed(self) -> "_core.PackedLinear":
        """These rows packed: the store's own matrix when they are all of
        it. Rows of a fused matrix used alone (an attention's Q projection
        in cross-attention) are packed once more, on first use: that use
        holds them twice."""
        if self.whole:
            return self.store.packed()
        key = (self.store.generation, _core.isa())
        if self._slice is None or self._slice[0] != key:
            rows = np.ascontiguousarray(self.store.values()[self.start:self.stop])
            self._slice = (key, _core.pack_linear(rows, bf16=self.store.bf16))
        return self._slice[1]

    def __getstate__(self) -> Dict[str, Any]:
        return {"store": self.store, "start": self.start, "stop": self.stop}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["store"], state["start"], state["stop"])  # type: ignore[misc]
