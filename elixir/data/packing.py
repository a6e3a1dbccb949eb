"""Documents to fixed-length rows, and rows to the batches of a run, in an order that does not depend
on the number of ranks.

[Note: the order of batches]
Each epoch is a permutation of the training rows drawn from (seed, epoch); global batch k of the run is
the k-th run of `batch_size` rows of that order (an epoch drops the rows that do not fill a batch), and
rank r of N takes its slice r of every global batch. So the rows a step trains on depend only on the seed
and the step, never on N; the position in the data is one integer (batches drawn so far), saved in every
checkpoint, and a run resumed on any number of ranks continues with exactly the next batch. Each rank
reads only its own rows of the memory-mapped documents.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from elixir.data.formats import IGNORE, Documents

PACKINGS = ("pack", "pad")


class Rows:
    """Rows of `seq_len` tokens cut from documents.

    `pack`: documents back to back, cut every `seq_len` tokens, so no row is padded but the last; a
    document that crosses a row's end continues in the next row. Position ids restart at every document
    (and every row), and each document's first label is -100 (it would be predicted from the document
    before). transformers reads such position ids as document boundaries and masks attention between
    documents (its packed-sequence masks, in the models built on `create_causal_mask`: Llama, Mistral,
    Mixtral, Qwen2/3, Gemma, Phi-3, OLMo, ...); a model that does not take position ids (the reference
    GPT) attends across a row's documents, and only the labels respect their boundaries.

    `pad`: one document per row, cut at `seq_len` and padded with `pad_id`; `attention_mask` is 0 and the
    label -100 on the padding.
    """

    def __init__(self, docs: Documents, seq_len: int, *, packing: str = "pack", pad_id: int = 0,
                 position_ids: bool = True) -> None:
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r}: use one of {', '.join(PACKINGS)}")
        self.docs = docs
        self.seq_len = seq_len
        self.packing = packing
        self.pad_id = pad_id
        self.position_ids = position_ids and packing == "pack"
        n = docs.num_tokens
        self.num_rows = -(-n // seq_len) if packing == "pack" else len(docs)

    def truncated(self) -> int:
        """Documents longer than a row (`pad` cuts them; `pack` continues them in the next row)."""
        return int((np.diff(self.docs.offsets) > self.seq_len).sum())

    def row(self, i: int) -> dict[str, np.ndarray]:
        T = self.seq_len
        ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE, dtype=np.int64)
        offsets = self.docs.offsets
        if self.packing == "pad":
            lo = int(offsets[i])
            hi = min(int(offsets[i + 1]), lo + T)
            ids[: hi - lo] = self.docs.tokens[lo:hi]
            labels[: hi - lo] = self.docs.labels[lo:hi]
            mask = np.zeros(T, dtype=np.int64)
            mask[: hi - lo] = 1
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}
        lo = i * T
        hi = min(lo + T, self.docs.num_tokens)
        ids[: hi - lo] = self.docs.tokens[lo:hi]
        labels[: hi - lo] = self.docs.labels[lo:hi]
        starts = offsets[np.searchsorted(offsets, lo, side="right") : np.searchsorted(offsets, hi, side="left")] - lo
        labels[starts] = IGNORE
        out = {"input_ids": ids, "labels": labels}
        if self.position_ids:
            # segments: the row's first token, every document start inside it, and the padding (if any)
            bounds = np.concatenate([[0], starts, [hi - lo] if hi - lo < T else []]).astype(np.int64)
            at = np.arange(T)
            out["position_ids"] = at - bounds[np.searchsorted(bounds, at, side="right") - 1]
        return out

    def batch(self, row_ids) -> dict[str, Tensor]:
        rows = [self.row(int(i)) for i in row_ids]
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}  # each (B_local, T)


def split_rows(num_rows: int, val_fraction: float) -> tuple[range, range]:
    """(train, val) row ranges: the last `val_fraction` of the rows (at least one) is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be strictly between 0 and 1 (e.g. 0.05)")
    n_val = max(1, round(num_rows * val_fraction))
    if num_rows - n_val < 1:
        raise ValueError(
            f"the data make {num_rows} row(s) of --seq-len tokens, too few to hold some out for validation; "
            "use more data or a shorter --seq-len"
        )
    return range(0, num_rows - n_val), range(num_rows - n_val, num_rows)


class SequenceBatches:
    """An endless iterator of batches of `rows` (see [Note: the order of batches]): dicts of
    (batch_size / world_size, seq_len) tensors, this rank's slice of each global batch. `shuffle=False`
    (validation) walks the rows in order and wraps around."""

    def __init__(self, rows: Rows, row_ids: range, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by world_size={world_size}; "
                f"use a multiple of {world_size} (e.g. {max(1, batch_size // world_size) * world_size})"
            )
        if shuffle and len(row_ids) < batch_size:
            raise ValueError(
                f"the training data make {len(row_ids)} row(s) of {rows.seq_len} tokens, fewer than one batch of "
                f"--batch-size {batch_size}; use a smaller --batch-size or --seq-len, or more data"
            )
        self.rows = rows
        self.row_ids = row_ids
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batches_drawn = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.row_ids) // self.batch_size

    def global_rows(self, k: int) -> np.ndarray:
        """The row ids of global batch `k` of the run, over all ranks."""
        B = self.batch_size
        if not self.shuffle:
            return np.array([self.row_ids[(k * B + i) % len(self.row_ids)] for i in range(B)])
        epoch, j = divmod(k, self.batches_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.row_ids))
            self._epoch_order = (epoch, order)
        picked = self._epoch_order[1][j * B : (j + 1) * B]
        return np.asarray(self.row_ids)[picked]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        ids = self.global_rows(self.batches_drawn)
        self.batches_drawn += 1
        start = self.rank * self.local_batch_size
        return self.rows.batch(ids[start : start + self.local_batch_size])

    def peek(self) -> dict[str, Tensor]:
        """The next batch, without moving the stream on (the planner profiles it)."""
        batch = next(self)
        self.batches_drawn -= 1
        return batch

    def state_dict(self) -> dict[str, object]:
        """Where the stream is (see [Note: the order of batches]), and what it must resume on."""
        return {"kind": "rows", "seed": self.seed, "batches_drawn": self.batches_drawn, "batch_size": self.batch_size,
                "num_rows": len(self.row_ids)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        mine = self.state_dict()
        for key in ("kind", "seed", "batch_size", "num_rows"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"the data position was saved with {key}={state.get(key)!r}, this run has {mine[key]!r}: the "
                    "data or its flags changed; resume with the same data, tokenizer and batch flags"
                )
        self.batches_drawn = int(state["batches_drawn"])
