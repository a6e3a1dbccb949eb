"""The calibration caches: where they live, and reading and writing them.

`Hardware.measure()` keeps what it measured in cache_dir()/hardware-...json (the record's JSON, see
`_cache_path`), `measure_disk` a disk's bandwidth in cache_dir()/disk-...json. A cache is a file like any
other (see [Note: untrusted files] in elixir/validation.py): damaged or of another format version, it is
ignored with a one-line warning and the machine measured again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import warnings
from pathlib import Path

import torch

from elixir.hardware.machine import _device, _device_label, _local_ranks, _nodes
from elixir.hardware.record import Hardware

_DISK_FORMAT_VERSION = 3  # the disk cache's own format: unchanged since version 3 of the hardware record


def cache_dir() -> Path:
    """Where elixir caches what it measured: $ELIXIR_CACHE_DIR, else ~/.cache/elixir.

    The one place that reads ELIXIR_CACHE_DIR; everything else asks this function."""
    configured = os.environ.get("ELIXIR_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "elixir"


def _cache_path(quick: bool) -> Path:
    """One cache file per machine, device, torch version, threads per process, number of ranks sharing the
    machine and number of nodes: everything that changes the measured rates. Ranks measure together, so on a
    CPU each sees its share of the cores (and on a GPU server its share of the host's bandwidth for the host
    AdamW rate); a process with one thread computes at about half the rate of one with two on two cores, and
    the host AdamW and copies too. A job on several nodes also measures the links between them (`-<n>nodes`),
    which a job on one never has. A process that differs in any of them finds no cache and measures its own
    rates (a few seconds), rather than scaling another process's by a guessed factor."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()) or "host"
    ranks, nodes = _local_ranks(), _nodes()
    version = re.sub(r"[^A-Za-z0-9.]+", "-", torch.__version__)
    suffix = (f"-{ranks}ranks" if ranks > 1 else "") + (f"-{nodes}nodes" if nodes > 1 else "") + (
        "-quick" if quick else "")
    return cache_dir() / (f"hardware-{host}-{_device_label(_device())}-torch{version}-"
                          f"{torch.get_num_threads()}threads{suffix}.json")


def _disk_cache_path(folder: str, quick: bool) -> Path:
    """The disk cache of `folder`'s filesystem: one file per machine and filesystem (device number)."""
    st = os.stat(folder)
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()) or "host"
    return cache_dir() / f"disk-{host}-{st.st_dev}{'-quick' if quick else ''}.json"


def _read_cache(path: Path) -> Hardware | None:
    """The cached calibration, or None when there is none. A cache is a file like any other (see [Note:
    untrusted files] in elixir/validation.py): damaged or of another format version, it is ignored with
    a one-line warning, and the machine is measured again (and the cache replaced)."""
    text = _read_bytes(path)
    if text is None:
        return None
    try:
        return Hardware.from_json(text, source=str(path))
    except ValueError as e:
        _ignore_cache(path, str(e).removeprefix(f"{path}: "))
        return None


def _ignore_cache(path: Path, reason: str) -> None:
    reason = " ".join(reason.split()).removesuffix("; measure again")  # one line, whatever the file held
    warnings.warn(f"ignoring the calibration cache {path}: {reason[:200]}; measuring again", stacklevel=3)


def _write_cache(path: Path, text: str) -> bool:
    """Write a cache file atomically (ranks on one machine write at once, and nobody may read half a file);
    a cache that cannot be written costs a measurement next time, never this run: a warning, and False."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
        return True
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot write the calibration cache {path} ({e.strerror or e}); the figures are used "
                      "but not cached (set ELIXIR_CACHE_DIR to a writable folder)", stacklevel=3)
        return False


def _read_disk_cache(path: Path) -> tuple[float, float] | None:
    """(read, write) bytes/s of a disk cache file, or None when there is none; damaged or of another format
    version, it is ignored with a one-line warning, as `_read_cache` does."""
    from elixir.validation import Fields, load_json

    text = _read_bytes(path)
    if text is None:
        return None
    try:
        doc = Fields(load_json(text, str(path)), str(path))
        version = doc.data.get("format_version")
        if version != _DISK_FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"format_version={version!r}, this elixir reads {_DISK_FORMAT_VERSION}")
        doc.get("folder", "str", default="")
        return float(doc.get("read_bytes_per_s", "number", above=0)), float(doc.get("write_bytes_per_s", "number",
                                                                                   above=0))
    except ValueError as e:
        _ignore_cache(path, str(e).removeprefix(f"{path}: "))
        return None


def _disk_cache_text(folder: str, read: float, write: float) -> str:
    """What the disk cache of `folder` holds (written by `_write_cache`, read by `_read_disk_cache`)."""
    return json.dumps({"format_version": _DISK_FORMAT_VERSION, "folder": os.path.abspath(folder),
                       "read_bytes_per_s": read, "write_bytes_per_s": write})


def _read_bytes(path: Path) -> bytes | None:
    """A cache file's bytes; None when there is none, or (with a one-line warning) when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        _ignore_cache(path, e.strerror or str(e))
        return None
