"""A progress bar for long benchmark runs: tqdm when it is installed, a plain
one on stderr otherwise."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def progress(items: Sequence[T], *, enabled: bool = True, desc: str = "") -> Iterator[T]:
    """Yields items, showing progress on stderr when enabled."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm  # optional; untyped
    except ImportError:
        yield from _plain(items, desc)
        return
    yield from tqdm(items, desc=desc, leave=False)


def _plain(items: Sequence[T], desc: str, width: int = 30) -> Iterable[T]:
    total = len(items)
    for i, item in enumerate(items):
        done = width * i // max(total, 1)
        sys.stderr.write(f"\r{desc} [{'#' * done}{'.' * (width - done)}] {i}/{total}")
        sys.stderr.flush()
        yield item
    sys.stderr.write(f"\r{desc} [{'#' * width}] {total}/{total}\n")
    sys.stderr.flush()
