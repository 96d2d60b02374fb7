"""Type aliases of the public API."""
from __future__ import annotations

from typing import Iterable, Literal, Tuple, Union

IntPair = Union[int, Tuple[int, int]]
# int, (h, w), ((top, bottom), (left, right)), 'same' or 'valid'.
Padding = Union[int, Tuple[int, int], Tuple[Tuple[int, int], Tuple[int, int]], str]
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
Needs = Union[str, Iterable[str]]
