"""Argument checks shared by the pruning packages: every error names the argument and says what
was expected. Numbers are Python/numpy numbers, never bools (``True`` is not a count) and never
tensors (reading one is a hidden device synchronisation); NaN and infinities are refused."""
import math
import numbers
from typing import Sequence

from torch import Tensor


def check_fraction(value, name: str, *, upper_inclusive: bool = True, what: str = "a fraction") -> float:
    """``value`` as a float in ``[0, 1]`` (``[0, 1)`` unless ``upper_inclusive``)."""
    expected = f"{name}: expected {what} in [0, 1{']' if upper_inclusive else ')'}, got {value!r}"
    if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(expected)
    if not (math.isfinite(value) and 0.0 <= value and (value <= 1.0 if upper_inclusive else value < 1.0)):
        raise ValueError(expected)
    return float(value)


def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum``."""
    if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_shapes(shapes, name: str = "shapes", positive: bool = False) -> list[tuple[int, ...]]:
    """A sequence of weight shapes as tuples of ints (``>= 1`` each if ``positive``, else ``>= 0``)."""
    if isinstance(shapes, (str, bytes, Tensor)) or not isinstance(shapes, Sequence):
        raise TypeError(f"{name}: expected a list of weight shapes (sequences of ints), got {type(shapes).__name__}")
    out = []
    for i, s in enumerate(shapes):
        dims = tuple(s) if isinstance(s, Sequence) and not isinstance(s, (str, bytes)) else None
        if dims is None or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= positive
                                   for d in dims):
            low = 1 if positive else 0
            raise ValueError(f"{name}[{i}]: expected a shape of ints >= {low}, got {s!r}")
        out.append(tuple(int(d) for d in dims))
    return out


def check_length(values, n: int, name: str, what: str) -> list:
    """``values`` as a list of ``n`` items (one per ``what``)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, Tensor)):
        raise TypeError(f"{name}: expected a list with one entry per {what} ({n}), got {type(values).__name__}")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name}: expected one entry per {what} ({n}), got {len(values)}")
    return values
