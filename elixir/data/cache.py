"""The tokenization cache: documents of a data set, tokenized once and memory-mapped after.

The key is a hash of everything the token ids depend on: the input files (paths, sizes, modification
times), the format and its fields, and the tokenizer's fingerprint. A cache entry is a folder of
three .npy files and a meta.json, written under a temporary name and renamed, so an interrupted run
never leaves half an entry; the arrays are memory-mapped, so every rank of a machine shares the pages
and reads only the rows it trains on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from elixir.data.formats import Documents, Fields

CACHE_VERSION = 1


def cache_key(data_fingerprint: str, fields: Fields, tokenizer_fingerprint: str) -> str:
    text = json.dumps([CACHE_VERSION, data_fingerprint, dataclasses.asdict(fields), tokenizer_fingerprint])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def default_cache_root() -> Path:
    """Where tokenized data goes unless `--cache-dir` says otherwise: elixir's cache folder."""
    from elixir.hardware import cache_dir

    return cache_dir() / "tokens"


def lookup(root: Path, key: str) -> Documents | None:
    """The cached documents of `key`, memory-mapped; None when absent or damaged (then built again)."""
    entry = root / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        docs = Documents(*(np.load(entry / f"{name}.npy", mmap_mode="r") for name in ("tokens", "labels", "offsets")))
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION or not docs.num_tokens == len(docs.tokens) == len(docs.labels):
        return None
    return docs


def store(root: Path, key: str, docs: Documents, info: dict) -> None:
    """Write `docs` as cache entry `key` (atomically: a temporary folder renamed into place)."""
    entry = root / key
    tmp = root / f"{key}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in ("tokens", "labels", "offsets"):
        np.save(tmp / f"{name}.npy", getattr(docs, name))
    (tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, **info}, indent=1))
    if entry.exists():  # a damaged entry, or one another process wrote meanwhile: ours is as good
        shutil.rmtree(entry, ignore_errors=True)
    try:
        tmp.rename(entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process renamed its copy first


def cached(root: Path, key: str, build: Callable[[], tuple[Documents, dict]]) -> tuple[Documents, bool]:
    """(documents, whether they came from the cache): the entry of `key`, else `build()` stored and
    read back memory-mapped. An unwritable cache folder only costs the speed-up."""
    docs = lookup(root, key)
    if docs is not None:
        return docs, True
    docs, info = build()
    try:
        store(root, key, docs, info)
    except OSError:
        return docs, False
    return lookup(root, key) or docs, False
