"""The embedded corpus, text files, and byte-token batches of random windows.

Tokens are bytes (vocabulary 256), so any text trains the byte-level GPT presets without a
tokenizer. The embedded corpus is CPython's own documentation (`pydoc_data.topics`), present in
every CPython, so the default job needs no download; its exact text varies by Python release.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
"""Files that `load_text` reads from a folder as plain text; anything else there is skipped (.json and
.jsonl files hold records, which `elixir.data.records` reads through the datasets library)."""


def load_corpus() -> bytes:
    """CPython's documentation topics, joined in sorted-key order, as UTF-8 (~465 kB)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_text(path: str | os.PathLike) -> bytes:
    """The bytes of a file, or of every text file under a folder (recursively, in sorted path
    order, joined by newlines; only names ending in one of `TEXT_SUFFIXES`)."""
    root = Path(path)
    if not root.exists():
        raise ValueError(
            f"text path {str(root)!r} does not exist; pass a text file or a folder of text files"
        )
    if root.is_file():
        data = root.read_bytes()
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        data = b"\n".join(p.read_bytes() for p in files)
    if not data:
        raise ValueError(
            f"no text found at {str(root)!r}; a folder is searched recursively for files ending in "
            f"{' '.join(TEXT_SUFFIXES)}"
        )
    return data


def split(data: bytes, val_fraction: float = 0.05) -> tuple[bytes, bytes]:
    """(train, val): the last `val_fraction` of the bytes is held out for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be strictly between 0 and 1 (e.g. 0.05)")
    cut = int(len(data) * (1.0 - val_fraction))
    if cut == 0 or cut == len(data):
        raise ValueError(
            f"{len(data)} bytes are too few to split with val_fraction={val_fraction}; "
            "pass more text or another fraction"
        )
    return data[:cut], data[cut:]


class TokenBatches:
    """An endless iterator of `{"input_ids": (B_local, seq_len), "labels": the same tensor}`.

    Each step draws the global batch (`batch_size` windows at random offsets) from a generator
    seeded with `seed`, identically on every rank; rank r keeps rows [r*B/N, (r+1)*B/N). So N
    ranks together see exactly the batch one rank would, and a run's loss does not depend on
    its world size. Labels equal input_ids: the model shifts them (Hugging Face convention).
    """

    def __init__(
        self,
        data: bytes,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must both be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size) with world_size={world_size} >= 1")
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by world_size={world_size}; "
                f"use a multiple of {world_size} (e.g. {max(1, batch_size // world_size) * world_size})"
            )
        if len(data) < seq_len + 1:
            raise ValueError(
                f"the text has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter seq_len or more text"
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self._tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (n_bytes,)
        self._generator = torch.Generator().manual_seed(seed)
        self._positions = torch.arange(seq_len)  # (T,)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        # Every rank draws the whole global batch, so the generators stay in step across ranks.
        n_offsets = self._tokens.numel() - self.seq_len + 1
        offsets = torch.randint(n_offsets, (self.batch_size,), generator=self._generator)  # (B,)
        start = self.rank * self.local_batch_size
        local = offsets[start : start + self.local_batch_size]  # (B_local,)
        input_ids = self._tokens[local[:, None] + self._positions].long()  # (B_local, T)
        return {"input_ids": input_ids, "labels": input_ids}

    def peek(self) -> dict[str, Tensor]:
        """The next batch, without moving the stream on (the planner profiles it)."""
        state = self._generator.get_state()
        batch = next(self)
        self._generator.set_state(state)
        return batch

    def state_dict(self) -> dict[str, object]:
        """Where the stream is, for checkpoints: resuming from it continues with the same batches."""
        return {"seed": self.seed, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"batch state was saved with seed={state['seed']}, this stream has seed={self.seed}"
            )
        self._generator.set_state(state["generator"])
