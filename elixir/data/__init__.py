"""Training data: the embedded corpus and byte tokens, tokenizers, data sets in their formats, and the
batches a training step takes.

Two paths. Byte tokens on plain text (the reference GPT presets, the default job): `TokenBatches` of
random windows (corpus.py). Everything else: files and folders read as tables (records.py), tokenized
by format into documents with labels (formats.py), cached (cache.py), cut into rows and served in an
order that does not depend on the number of ranks (packing.py). `tokenize` runs the middle of that.
"""

from __future__ import annotations

from elixir.data.cache import cache_key, cached, default_cache_root
from elixir.data.corpus import TEXT_SUFFIXES, TokenBatches, load_corpus, load_text, split
from elixir.data.formats import FORMATS, IGNORE, Documents, Fields, render_chat, resolve_format, tokenize_table
from elixir.data.packing import PACKINGS, Rows, SequenceBatches, split_rows
from elixir.data.records import Source, find_sources, read_table
from elixir.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, has_tokenizer, load_tokenizer

__all__ = [
    "FORMATS", "IGNORE", "PACKINGS", "TEXT_SUFFIXES", "ByteTokenizer", "Documents", "Fields", "HFTokenizer", "Rows",
    "SequenceBatches", "Source", "TokenBatches", "Tokenizer", "cache_key", "cached", "default_cache_root",
    "find_sources", "has_tokenizer", "load_corpus", "load_text", "load_tokenizer", "read_table", "render_chat",
    "resolve_format", "split", "split_rows", "tokenize", "tokenize_table",
]


def tokenize(sources: list[Source], fields: Fields, tokenizer: Tokenizer) -> tuple[Documents, dict]:
    """Every input's rows tokenized into documents, in order, and a summary (rows, documents, tokens,
    trained tokens, format per file). The format is resolved per file, so a folder may mix them."""
    from elixir.data.formats import _Builder

    builder = _Builder()
    formats: dict[str, str] = {}
    rows = 0
    for source in sources:
        table = read_table(source)
        resolved = resolve_format(table, fields)
        formats[source.path] = resolved.format
        tokenize_table(table, resolved, tokenizer, builder)
        rows += table.num_rows
    docs = builder.done()
    if len(docs) == 0:
        raise ValueError(
            f"--data: {', '.join(s.path for s in sources)} made no document (every row empty); check the field flags"
        )
    info = {"rows": rows, "documents": len(docs), "tokens": docs.num_tokens,
            "trained_tokens": int((docs.labels != IGNORE).sum()), "formats": formats}
    return docs, info
