"""Checks of what Elixir reads and writes: the fields of untrusted files, output paths, optional packages.

[Note: untrusted files]
Every file Elixir reads may be truncated, hand-edited or hostile: checkpoint manifests, `common.pt`,
safetensors headers, plan JSON, the calibration caches, Hugging Face `config.json`, sharded-safetensors
indexes. Each kind has one reader, and that reader checks every field it uses for presence, type and
range before using it; a failure is the kind's named error (`CheckpointError` for checkpoint and
weights files, `ValueError` for plans, configs and caches) naming the file, the field and what was
expected. So no `KeyError`, `TypeError`, `IndexError` or `struct.error` leaves a reader, nothing is
allocated beyond what the file's own size bounds, and a reader writes nothing. `Fields` below is the
shared vocabulary of those checks; tests/test_fuzz_*.py hold every reader to the contract.

Output paths are checked the other way round: before the work that produces a file starts (a search,
an export), so that an hour of work never ends in "No such file or directory", and the error names
the path the user gave, never an internal temporary name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

_MISSING = object()

_KINDS = {  # kind -> (Python types, words for it)
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "list": ((list,), "a list"),
    "object": ((dict,), "an object"),
}


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def shown(value, limit: int = 40) -> str:
    """A value as a message shows it: short, and its JSON type."""
    if isinstance(value, (dict, list)):
        return f"{json_type(value)} of {len(value)}"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({json_type(value)})" if value is not None else "null"


def load_json(data: bytes | str, file: str, *, error: type[Exception] = ValueError, what: str = "the file is damaged"):
    """Parse JSON text of `file`; `error` naming the file when it is not JSON. Nesting deep enough to
    exhaust the parser's recursion (a hostile file) is refused like any other damage."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{file}: not valid JSON ({reason[:120]}); {what}") from None


def read_json_file(path: str, *, error: type[Exception] = ValueError, what: str = "the file is damaged"):
    """The parsed JSON of the file at `path`; `error` naming it when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return load_json(data, path, error=error, what=what)


class Fields:
    """One JSON object of a file, read field by field. Each read checks the field's presence, type and
    range, and raises `error` naming the file, the field's path in the file and what was expected."""

    def __init__(self, data, file: str, *, error: type[Exception] = ValueError, at: str = "") -> None:
        self.file, self.error, self.at = file, error, at
        if not isinstance(data, dict):
            where = f"field {at!r}" if at else "the top level"
            raise error(f"{file}: {where} is {shown(data)}; expected an object")
        self.data = data

    def path(self, key) -> str:
        if isinstance(key, int):
            return f"{self.at}[{key}]"
        return f"{self.at}.{key}" if self.at else str(key)

    def fail(self, at: str, message: str) -> Exception:
        """The error for field `at` (a path such as 'ranks[0][1].slots'): '<file>: field <at> <message>'."""
        return self.error(f"{self.file}: field {at!r} {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: str, *, default=_MISSING, least=None, most=None, above=None,
            choices=None, nullable: bool = False, finite: bool = True):
        """Field `key` of `kind` (int, number, str, bool, list, object); `least`/`most` bound it (inclusive),
        `above` from below (exclusive), `choices` lists the values allowed. A missing field is an error
        unless a `default` is given; null is allowed only when `nullable`; numbers are finite unless not
        `finite` (JSON's NaN and Infinity)."""
        if key not in self.data:
            if default is not _MISSING:
                return default
            raise self.fail(self.path(key), f"is missing; expected {expected(kind, least, most, above, choices)}")
        return self.check(self.data[key], self.path(key), kind, least=least, most=most, above=above,
                          choices=choices, nullable=nullable, finite=finite)

    def check(self, value, at: str, kind: str, *, least=None, most=None, above=None, choices=None,
              nullable: bool = False, finite: bool = True):
        """`value`, found at path `at` of this file, checked as `get` checks a field; returns it."""
        if value is None and nullable:
            return None
        types, _ = _KINDS[kind]
        ok = isinstance(value, types) and not (isinstance(value, bool) and kind in ("int", "number"))
        if ok and kind == "number" and finite:
            ok = math.isfinite(value)
        if ok and choices is not None:
            ok = value in choices
        if ok and kind in ("int", "number"):
            ok = (least is None or value >= least) and (most is None or value <= most) and (
                above is None or value > above)
        if not ok:
            want = expected(kind, least, most, above, choices, finite) + (" or null" if nullable else "")
            raise self.fail(at, f"is {shown(value)}; expected {want}")
        return value

    def obj(self, key: str, *, default=_MISSING):
        """Field `key`, an object, as Fields of its own (`default` when it is missing and one is given)."""
        if key not in self.data and default is not _MISSING:
            return default
        return Fields(self.get(key, "object"), self.file, error=self.error, at=self.path(key))

    def objects(self, key: str, *, default=_MISSING) -> list[Fields]:
        """Field `key`, a list of objects, as Fields."""
        if key not in self.data and default is not _MISSING:
            return default
        items = self.get(key, "list")
        return [Fields(v, self.file, error=self.error, at=f"{self.path(key)}[{i}]") for i, v in enumerate(items)]

    def only(self, allowed) -> None:
        """Refuse fields that are not in `allowed` (a file of another program, or a misspelt field)."""
        for key in self.data:
            if key not in allowed:
                raise self.fail(self.path(key), f"is not a field of this file; the fields are {', '.join(allowed)}")


def expected(kind: str, least=None, most=None, above=None, choices=None, finite: bool = True) -> str:
    """What a field must be, in words: "an integer >= 1", "one of 'device', 'host'"."""
    if choices is not None:
        return "one of " + ", ".join(repr(c) for c in choices)
    words = _KINDS[kind][1]
    if kind == "number" and finite:
        words = "a finite number"
    if least is not None and most is not None:
        return f"{words} in [{least}, {most}]"
    if least is not None:
        return f"{words} >= {least}"
    if above is not None:
        return f"{words} > {above}"
    if most is not None:
        return f"{words} <= {most}"
    return words


def plain_file_name(name, file: str, at: str, *, error: type[Exception] = ValueError) -> str:
    """A file name a file lists beside itself: one path component, so a hostile list cannot reach
    outside its folder ('../x', '/etc/passwd', 'a/b')."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise error(f"{file}: field {at!r} is {shown(name)}; expected a plain file name in the same folder")
    return name


# --- output paths --------------------------------------------------------------------------------


def _label(path: str, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def existing_ancestor(path: str) -> str:
    """`path` itself when it exists, else its nearest folder that does (whose filesystem it would be on)."""
    here = os.path.abspath(path)
    while not os.path.lexists(here):
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    return here


def probe_writable(folder: str, label: str) -> None:
    """ValueError naming `label` unless a file can be created and removed in `folder`: the only test of
    writability that the filesystem itself answers (os.access says yes to root in /proc, on some network
    mounts, in a full quota)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".elixir-write-check-", dir=folder)
    except OSError as e:
        raise ValueError(
            f"{label}: cannot create files in {folder} ({e.strerror or e}); choose a path in a folder you can write"
        ) from None
    os.close(fd)
    os.unlink(name)


def _check_space(folder: str, nbytes: int, label: str) -> None:
    if nbytes <= 0:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no figure to check against: the write itself will tell
    if free < nbytes:
        raise ValueError(
            f"{label}: needs {format_bytes(nbytes)} but the filesystem of {folder} has {format_bytes(free)} free; "
            "free some space or choose a path on another filesystem"
        )


def format_bytes(nbytes: int) -> str:
    """`nbytes` for a message: "1.5 GiB", "12.0 KiB", "100 bytes"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def check_output_file(path: str, *, flag: str | None = None, nbytes: int = 0, make_parents: bool = False) -> None:
    """ValueError naming `path` (and `flag`, the option that gave it) unless a file can be written there:
    not a folder, its folder exists (or, with `make_parents`, can be created) and takes new files, and
    holds `nbytes` more when that size is known. Call it before the work that produces the file."""
    label = _label(path, flag)
    if not path:
        raise ValueError(f"{label or 'the output path'}: empty; give a file path")
    if os.path.isdir(path):
        raise ValueError(f"{label}: is a folder; give a file path (e.g. {os.path.join(path, 'out')})")
    if os.path.lexists(path) and not os.path.isfile(path) and not os.path.islink(path):
        raise ValueError(f"{label}: exists and is not a regular file; choose another path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        existing = existing_ancestor(folder)
        if not os.path.isdir(existing):
            raise ValueError(f"{label}: {existing} is a file, not a folder; choose another path")
        if not make_parents:
            raise ValueError(f"{label}: folder {folder} does not exist; create it or choose another path")
        folder = existing
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{label}: exists and is read-only; choose another path or make it writable")
    probe_writable(folder, label)
    _check_space(folder, nbytes, label)


def check_output_folder(path: str, *, flag: str | None = None, nbytes: int = 0) -> None:
    """ValueError naming `path` unless a folder can be created (or written into) there and holds
    `nbytes` more when that size is known. Parents are created by the writers, so only the nearest
    existing ancestor must take new entries. Call it before the work that produces the folder."""
    label = _label(path, flag)
    if not path:
        raise ValueError(f"{label or 'the output path'}: empty; give a folder path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{label}: exists and is not a folder; choose another path")
    existing = existing_ancestor(path)
    if not os.path.isdir(existing):
        raise ValueError(f"{label}: {existing} is a file, not a folder; choose another path")
    probe_writable(existing, label)
    _check_space(existing, nbytes, label)


def require_package(module: str, *, needed_for: str, install: str) -> None:
    """ValueError saying what needs `module` and how to install it, unless it imports. Called before the
    work whose end needs it (`--plot` needs matplotlib only after the search)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{needed_for} needs {module}, which is not installed ({e}): {install}") from None
