"""Typed fields of the sweep file: each checks one value, names what it expected, fills defaults.

A :class:`Field` turns a TOML value into the canonical Python value (ints given for a float
field become floats, so ``lr = 1`` and ``lr = 1.0`` give the same trial id) or reports a problem
with the key's path. :func:`check_table` applies a ``{key: Field}`` schema to a table: unknown keys
and missing required keys are problems too.
"""
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from sparse_engine.sweep.source import KeyPath, Problems

REQUIRED = object()


class Invalid(ValueError):
    """Raised by a field check; the message says what was expected."""


@dataclass(frozen=True)
class Field:
    """One key of a table: ``check(value) -> canonical value`` (raises ``Invalid``), a default
    (``REQUIRED``: must be given), and a line of documentation."""
    check: Callable[[Any], Any]
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def integer(minimum: Optional[int] = None, maximum: Optional[int] = None) -> Callable[[Any], int]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise Invalid(f"expected an integer, got {v!r}")
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise Invalid(f"expected an integer {bounds}, got {v!r}")
        return int(v)
    return check


def real(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[Any], float]:
    """A finite number in the interval given (open ends where said); ints are accepted."""
    def check(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise Invalid(f"expected a finite number, got {v!r}")
        bad = (low is not None and (v < low or (low_open and v == low))) or \
              (high is not None and (v > high or (high_open and v == high)))
        if bad:
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise Invalid(f"expected a number in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}, "
                          f"got {v!r}")
        return float(v)
    return check


def choice(*options: str) -> Callable[[Any], str]:
    def check(v):
        if v not in options:
            raise Invalid(f"expected one of {', '.join(map(repr, options))}, got {v!r}")
        return v
    return check


def string(v) -> str:
    if not isinstance(v, str) or not v:
        raise Invalid(f"expected a non-empty string, got {v!r}")
    return v


def boolean(v) -> bool:
    if not isinstance(v, bool):
        raise Invalid(f"expected true or false, got {v!r}")
    return v


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check``, or the string "none"/"all" meaning None (TOML has no null)."""
    def wrapped(v):
        if v is None or v in ("none", "all"):
            return None
        return check(v)
    return wrapped


def table(v) -> dict:
    if not isinstance(v, dict):
        raise Invalid(f"expected a table, got {v!r}")
    return dict(v)


def array(v) -> list:
    if not isinstance(v, list):
        raise Invalid(f"expected an array, got {v!r}")
    return list(v)


def plain_value(v):
    """Any TOML value, as plain JSON-able Python (dates are refused: they do not hash stably)."""
    if isinstance(v, (bool, int, float, str)):
        if isinstance(v, float) and not math.isfinite(v):
            raise Invalid(f"expected a finite number, got {v!r}")
        return v
    if isinstance(v, list):
        return [plain_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain_value(x) for k, x in v.items()}
    raise Invalid(f"expected a number, string, boolean, array or table, got {type(v).__name__} {v!r}")


def import_path(v) -> str:
    """``package.module:function``."""
    if not isinstance(v, str) or v.count(":") != 1 or not all(v.split(":")):
        raise Invalid(f"expected 'package.module:function', got {v!r}")
    return v


def is_import_path(v) -> bool:
    return isinstance(v, str) and ":" in v


@dataclass
class Checked:
    """The result of :func:`check_table`: the canonical values, and whether all were valid."""
    values: dict = field(default_factory=dict)
    ok: bool = True


def check_value(f: Field, value, path: KeyPath, problems: Problems):
    try:
        return f.check(value), True
    except Invalid as e:
        problems.add(path, str(e))
        return None, False


def check_table(values: Any, schema: Mapping[str, Field], path: KeyPath, problems: Problems,
                allow_extra: bool = False) -> Checked:
    """Check ``values`` (a TOML table) against ``schema``; defaults are filled in. With
    ``allow_extra`` unknown keys are returned under ``"__extra__"`` instead of being problems."""
    out = Checked()
    if not isinstance(values, dict):
        problems.add(path, f"expected a table, got {values!r}")
        out.ok = False
        return out
    extra = {}
    for key, value in values.items():
        if key in schema:
            out.values[key], ok = check_value(schema[key], value, path + (key,), problems)
            out.ok &= ok
        elif allow_extra:
            extra[key] = value
        else:
            problems.add(path + (key,), f"unknown key; expected one of {', '.join(sorted(schema))}")
            out.ok = False
    for key, f in schema.items():
        if key not in values:
            if f.required:
                problems.add(path + (key,), f"missing (required{': ' + f.doc if f.doc else ''})")
                out.ok = False
            else:
                out.values[key] = f.default
    if allow_extra:
        out.values["__extra__"] = extra
    return out


def one_of_names(names: Sequence[str], what: str) -> Callable[[Any], str]:
    def check(v):
        if v not in names:
            raise Invalid(f"expected one of the {what} defined in the file ({', '.join(map(repr, names))}), "
                          f"got {v!r}")
        return v
    return check
