"""Reading `--data`: text files and folders, .jsonl, .json arrays, .parquet, .csv and datasets saved
with `datasets.save_to_disk`, as tables of rows (one per file, so that errors name the file and row).

Plain text files are read directly (each file is one document, so the default job needs nothing but
torch); every other format goes through the `datasets` library, an extra (`pip install
'elixir-train[data]'`). Its own cache of the parsed files goes under elixir's cache folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from elixir.data.corpus import TEXT_SUFFIXES

RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffixes read through the `datasets` library, with the builder that reads each."""


@dataclass
class Table:
    """The rows of one file: its columns by name, each a list with one value per row."""

    source: str
    """The file (or saved dataset) the rows come from, as errors name it."""
    columns: dict[str, list]

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass(frozen=True)
class Source:
    """One readable input of `--data`: a file of some kind, or a saved dataset folder."""

    path: str
    kind: str
    """'text', 'json', 'parquet', 'csv', 'saved' (datasets.save_to_disk) or 'corpus' (the embedded one)."""


def find_sources(path: str | None) -> list[Source]:
    """The inputs under `--data` (the embedded corpus when None), in sorted path order; ValueError naming
    the path and the fix when it does not exist, cannot be read or holds nothing readable."""
    if path is None:
        return [Source("<embedded corpus>", "corpus")]
    root = Path(path)
    if not root.exists():
        raise ValueError(f"--data {path!r} does not exist; pass a file or a folder of files")
    if root.is_dir() and _is_saved_dataset(root):
        return [Source(str(root), "saved")]
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
    sources = []
    for f in files:
        kind = "text" if f.suffix in TEXT_SUFFIXES else RECORD_SUFFIXES.get(f.suffix)
        if kind is None and root.is_file():
            kind = "text"  # a file named on purpose is read as text, whatever its suffix
        if kind is None:
            continue
        if not os.access(f, os.R_OK):
            raise ValueError(f"--data: {str(f)!r} cannot be read (permission denied); fix its permissions or move it")
        sources.append(Source(str(f), kind))
    if not sources:
        known = " ".join((*TEXT_SUFFIXES, *RECORD_SUFFIXES))
        raise ValueError(
            f"--data {path!r}: no file to read; a folder is searched recursively for files ending in {known}, "
            "or is a dataset saved with datasets.save_to_disk"
        )
    return sources


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file() or (
        folder / "dataset_dict.json"
    ).is_file()


def fingerprint(sources: list[Source]) -> str:
    """Changes when any input changes: paths, sizes and modification times (the corpus: its text)."""
    h = hashlib.sha256()
    for s in sources:
        if s.kind == "corpus":
            from elixir.data.corpus import load_corpus

            h.update(load_corpus())
            continue
        paths = [Path(s.path)] if s.kind != "saved" else sorted(p for p in Path(s.path).rglob("*") if p.is_file())
        for p in paths:
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def read_table(source: Source) -> Table:
    """The rows of one input; ValueError naming the file for one that cannot be parsed or holds no rows."""
    if source.kind == "corpus":
        from pydoc_data.topics import topics

        # one document per documentation topic, in sorted-key order (as load_corpus joins them)
        return Table(source.path, {"text": [topics[k] for k in sorted(topics)]})
    if source.kind == "text":
        try:
            text = Path(source.path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--data: {source.path!r} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, or remove it "
                "from the folder"
            ) from None
        if not text.strip():
            raise ValueError(f"--data: {source.path!r} is empty; remove it, or give it some text")
        return Table(source.path, {"text": [text]})
    if source.kind != "saved" and os.path.getsize(source.path) == 0:
        raise ValueError(f"--data: {source.path!r} is empty; remove it, or fill it")
    datasets = _datasets(source)
    from elixir.hardware import cache_dir

    try:
        if source.kind == "saved":
            ds = datasets.load_from_disk(source.path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise ValueError(
                        f"--data {source.path!r} is a DatasetDict without a 'train' split (it has {sorted(ds)}); save "
                        "the split to train on by itself, or name it 'train'"
                    )
                ds = ds["train"]
        else:
            ds = datasets.load_dataset(
                source.kind, data_files=[source.path], split="train", cache_dir=str(cache_dir() / "datasets"),
            )
    except ValueError as e:
        if str(e).startswith("--data"):
            raise
        raise _unreadable(source, e) from None
    except Exception as e:  # the library's parse errors vary by format and release: name the file whatever they are
        raise _unreadable(source, e) from None
    if ds.num_rows == 0:
        raise ValueError(f"--data: {source.path!r} has no rows; remove it, or fill it")
    return Table(source.path, {name: ds[name] for name in ds.column_names})


def _unreadable(source: Source, e: Exception) -> ValueError:
    hint = {
        "json": "a .jsonl file holds one JSON object per line, a .json file an array of objects",
        "csv": "a .csv file has a header row naming its columns",
        "parquet": "write it with pandas or pyarrow",
        "saved": "save it again with datasets.save_to_disk",
    }[source.kind]
    return ValueError(f"--data: {source.path!r} could not be read as {source.kind} ({type(e).__name__}: {e}); {hint}")


def _datasets(source: Source):
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"--data: reading {source.path!r} ({source.kind}) needs the datasets library: "
            "pip install 'elixir-train[data]'"
        ) from None
    datasets.disable_progress_bars()  # the training job prints its own progress
    return datasets
