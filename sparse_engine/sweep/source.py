"""The sweep file as text: TOML parsing, the line of each key, overrides, and error collection.

``tomllib`` (``tomli`` on Python 3.10) reports the line of a syntax error but keeps no positions
for keys, so :class:`SweepSource` finds them itself: it scans the table headers and ``key =``
lines and parses each key with ``tomllib`` (so quoting and dotted keys follow TOML). Errors found
later (an unknown key, a bad value) name the file and line of the key, or of the closest table
that holds it, when the key was written in the file.
"""
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

KeyPath = tuple  # of str (table keys) and int (array-of-tables indices)

_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\"'.\s]+?)\s*=")


class SweepFileError(ValueError):
    """A sweep file that cannot be run; ``problems`` lists every ``file:line: key: message``."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        head = "invalid sweep file" if len(self.problems) == 1 else f"{len(self.problems)} problems in the sweep file"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


def dotted(path: Iterable) -> str:
    """``("methods", "IMP+FT", "phases")`` -> ``methods."IMP+FT".phases``; indices as ``[i]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = part if re.fullmatch(r"[A-Za-z0-9_\-]+", part) else f'"{part}"'
            out += ("." if out else "") + part
    return out


def _key_path(text: str) -> Optional[tuple]:
    """The key path of a TOML key (``a."b c".d``), parsed by tomllib itself."""
    try:
        node = tomllib.loads(f"{text} = 0")
    except tomllib.TOMLDecodeError:
        return None
    path = []
    while isinstance(node, dict) and len(node) == 1:
        (key, node), = node.items()
        path.append(key)
    return tuple(path)


class SweepSource:
    """A parsed sweep file: ``data`` (the TOML tables) and ``line_of(path)``.

    Args:
        text: the TOML source.
        name: what errors call the file (its path).
    """

    def __init__(self, text: str, name: str = "<sweep>"):
        self.text, self.name = text, name
        try:
            self.data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SweepFileError([f"{name}: {e}"]) from None
        self._lines = self._scan(text)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "SweepSource":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SweepFileError([f"{path}: cannot read the sweep file ({e.strerror or e})"]) from None
        return cls(text, str(path))

    @staticmethod
    def _scan(text: str) -> dict:
        lines: dict = {}
        table: tuple = ()
        counts: dict = {}
        for number, line in enumerate(text.splitlines(), 1):
            header = _HEADER.match(line)
            if header and not line.lstrip().startswith("#"):
                path = _key_path(header.group(2))
                if path is None:
                    continue
                if header.group(1) == "[[":
                    counts[path] = counts.get(path, -1) + 1
                    path = path + (counts[path],)
                table = path
                lines.setdefault(table, number)
                continue
            assign = _ASSIGN.match(line)
            if assign and not line.lstrip().startswith("#"):
                key = _key_path(assign.group(1))
                if key:
                    lines.setdefault(table + key, number)
        return lines

    def line_of(self, path: KeyPath) -> Optional[int]:
        """The line where ``path`` (or the closest enclosing key or table) is written, or None."""
        path = tuple(path)
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None

    def where(self, path: KeyPath) -> str:
        line = self.line_of(path)
        return f"{self.name}:{line}" if line is not None else self.name


class Problems:
    """Collects every problem of a sweep file, so that one error lists them all."""

    def __init__(self, source: SweepSource):
        self.source = source
        self.items: list[str] = []

    def add(self, path: KeyPath, message: str) -> None:
        key = dotted(path)
        item = f"{self.source.where(path)}: {key + ': ' if key else ''}{message}"
        if item not in self.items:
            self.items.append(item)

    def raise_if_any(self) -> None:
        if self.items:
            raise SweepFileError(self.items)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is TOML (a bare word is a string)."""
    if "=" not in text:
        raise SweepFileError([f"--set {text!r}: expected KEY=VALUE (e.g. train.epochs=3)"])
    key, value = (s.strip() for s in text.split("=", 1))
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def apply_overrides(data: dict, overrides: Optional[Mapping[str, Any]]) -> dict:
    """A copy of the parsed file with ``{"a.b.c": value}`` set (tables created as needed)."""
    import copy
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        path = _key_path(key)
        if not path:
            raise SweepFileError([f"override {key!r}: not a TOML key"])
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SweepFileError([f"override {key!r}: {dotted(path[:path.index(part) + 1])} is not a table"])
            node = child
        node[path[-1]] = value
    return data
