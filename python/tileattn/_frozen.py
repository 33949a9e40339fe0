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

import threading
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core


class PackedRows:
    """A weight matrix (rows, in_features) held only packed for the core's
    GEMM: bf16 pairs when ``bf16``, else its own dtype. ``packed``, a pack
    of ``weight`` made already (current, on the active path), is adopted
    instead of packing again: freezing then never holds two packs."""

    def __init__(self, weight: np.ndarray, bf16: bool,
                 packed: Optional["_core.PackedLinear"] = None) -> None:
        self.bf16 = bf16
        self.shape: Tuple[int, int] = (int(weight.shape[0]), int(weight.shape[1]))
        self.dtype = weight.dtype
        self.generation = 0      # counts writes: packs of row ranges follow it
        self._lock = threading.Lock()
        self._packed = packed if packed is not None else _core.pack_linear(weight, bf16=bf16)

    def packed(self) -> "_core.PackedLinear":
        """The packed matrix for the active ISA path (packed again from
        itself after another path became active: the layouts differ)."""
        current = self._packed
        if current.isa != _core.isa():
            with self._lock:
                if self._packed.isa != _core.isa():
                    self._packed = _core.pack_linear(_core.unpack_linear(self._packed),
                                                     bf16=self.bf16)
                current = self._packed
        return current

    def values(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Rows [start, stop) (default: all) of the matrix, row-major (a
        new array)."""
        return _core.unpack_linear(self._packed, start, stop)

    def repacked(self, rows: Dict[int, np.ndarray]) -> "_core.PackedLinear":
        """The matrix with rows [start, start + len(r)) replaced by each
        ``rows[start]`` (cast to the dtype), packed: nothing of this store
        changes until ``commit`` (so a load of several parameters either
        lands whole or not at all)."""
        w = self.values()
        for start, r in rows.items():
            np.copyto(w[start:start + r.shape[0]], r, casting="unsafe")
        return _core.pack_linear(w, bf16=self.bf16)

    def commit(self, packed: "_core.PackedLinear") -> None:
        with self._lock:
            self._packed = packed
            self.generation += 1

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Rows [start, start + len(rows)) become ``rows``; packed again.
        Concurrent writes of different rows are serialised (none lost)."""
        with self._lock:
            self._packed = self.repacked({start: rows})
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
        rows = self.store.values(self.start, self.stop)
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
            rows = self.store.values(self.start, self.stop)
            self._slice = (key, _core.pack_linear(rows, bf16=self.store.bf16))
        return self._slice[1]

    @property
    def slice_nbytes(self) -> int:
        """Bytes of this part's own pack (cross-attention's; see ``packed``)."""
        return int(self._slice[1].nbytes) if self._slice is not None else 0

    def __getstate__(self) -> Dict[str, Any]:
        return {"store": self.store, "start": self.start, "stop": self.stop}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["store"], state["start"], state["stop"])  # type: ignore[misc]
