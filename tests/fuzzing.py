"""What tests/test_fuzz_*.py share: mutations of a valid file, and the bounds every reader is held to.

A reader of a file kind (see [Note: untrusted files] in elixir/validation.py) given any input must, within
`TIME_LIMIT_S` and `MEMORY_LIMIT_BYTES`, either read it or raise its kind's named error, and leave every
file of the folder it read unchanged (sha256 before and after). `check_reader` asserts exactly that for
one input and counts it; conftest.py prints the counts per kind at the end of the run.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import resource
import time
import tracemalloc
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st

COUNTS: Counter = Counter()
"""Inputs given to a reader, by file kind (printed by conftest.py's terminal summary)."""
FAILED: Counter = Counter()
"""Of those, the inputs the reader refused with its named error."""
TIME_LIMIT_S = 5.0
"""One input's reading, on a loaded CI machine: the readers take milliseconds, a hang takes forever."""
MEMORY_LIMIT_BYTES = 64 * 2**20
"""Python allocations while reading one input (the inputs are a few KiB: a reader that trusts a length
field of a damaged file would ask for gigabytes)."""
NATIVE_GROWTH_LIMIT_BYTES = 512 * 2**20
"""Growth of the process's peak resident memory while reading one input (torch allocates outside Python)."""


def examples(share: float = 1.0) -> int:
    """`share` of the active Hypothesis profile's max_examples (see conftest.py: `ci` by default, `long`
    for soak runs with --hypothesis-profile=long): kinds that are slower to read get a smaller share."""
    return max(1, int(settings.default.max_examples * share))


def truncation_points(size: int, *, dense: int = 64) -> range | list[int]:
    """Where to cut a file of `size` bytes: every byte boundary under the `long` profile; under `ci` every
    one of the first and last `dense` bytes (the length fields, magic numbers and closing brackets of
    the formats) and every 4th between them, which keeps a kind to a few seconds."""
    if settings.default.max_examples >= 1000:
        return range(size)
    return sorted(set(range(min(dense, size))) | set(range(dense, size, 4)) | set(range(max(0, size - dense), size)))


def digests(folder, prefix: str = "") -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                out.update(digests(entry.path, f"{prefix}{entry.name}/"))
            else:
                with open(entry.path, "rb") as f:
                    out[prefix + entry.name] = hashlib.sha256(f.read()).hexdigest()
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def check_reader(kind: str, folder, read, errors: type[Exception] | tuple, *, must_fail: bool = False,
                 before: dict[str, str] | None = None):
    """Call `read()` on one input under the bounds above; it may return or raise `errors` (with `must_fail`,
    it must raise), and every file under `folder` must be as it was (`before`, the digests of the folder
    as the test wrote it, when the test knows them already). Returns the error raised, or None."""
    before = digests(folder) if before is None else before
    rss = _peak_rss_bytes()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    error = None
    try:
        read()
    except errors as e:
        error = e
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
    assert elapsed < TIME_LIMIT_S, f"{kind}: {elapsed:.1f} s on one input"
    assert peak < MEMORY_LIMIT_BYTES, f"{kind}: {peak / 2**20:.0f} MiB allocated for one input"
    assert _peak_rss_bytes() - rss < NATIVE_GROWTH_LIMIT_BYTES, f"{kind}: resident memory grew"
    assert digests(folder) == before, f"{kind}: reading changed a file"
    if must_fail:
        assert error is not None, f"{kind}: the damaged input was accepted"
    COUNTS[kind] += 1
    FAILED[kind] += error is not None
    return error


# --- mutations of a JSON document -------------------------------------------------------------------

_OTHERS = [None, True, "x", 7, 2.5, [], {}, [1, "a"], {"k": None}]
NEGATIVE = [-1, -(2**63), -0.5, -math.inf]
HUGE = [2**63, 10**30, math.inf, math.nan, 1e308]


def _category(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def paths(doc, prefix: tuple = ()) -> list[tuple]:
    """The path (keys and indices) of every value in `doc` but the document itself."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += paths(value, (*prefix, key))
    return out


def dotted(path: tuple) -> str:
    """A path as the readers name fields: optimizer.param_groups[0].lr."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


@st.composite
def mutations(draw, doc):
    """(document, how, path): `doc` with one value removed ("remove"), replaced by a value of another
    JSON type ("retype"), or a number set negative ("negative") or huge, infinite or NaN ("huge")."""
    every = paths(doc)
    numbers = [p for p in every if _category(_get(doc, p)) == "number"]
    how = draw(st.sampled_from(["remove", "retype", "negative", "huge"] if numbers else ["remove", "retype"]))
    path = draw(st.sampled_from(numbers if how in ("negative", "huge") else every))
    out = copy.deepcopy(doc)
    parent, key = _get(out, path[:-1]), path[-1]
    if how == "remove":
        del parent[key]
    elif how == "retype":
        old = _category(parent[key])
        parent[key] = copy.deepcopy(draw(st.sampled_from([v for v in _OTHERS if _category(v) != old])))
    else:
        parent[key] = draw(st.sampled_from(NEGATIVE if how == "negative" else HUGE))
    return out, how, path


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def byte_flips(size: int):
    """Up to 8 (position, xor mask) pairs for a file of `size` bytes."""
    return st.lists(st.tuples(st.integers(0, max(0, size - 1)), st.integers(1, 255)), min_size=1, max_size=8)


def flipped(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for pos, mask in flips:
        out[pos] ^= mask
    return bytes(out)
