"""Updates of chunks whose fp32 master and optimizer states live on disk (see [Note: the disk tier] in
elixir/memory/disk.py): reading their regions ahead, pointing the master and states at a buffer for the
update, moving states the update made into the region, writing the parameter shard and the region back."""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import contextmanager

import torch

from elixir.memory import Chunk
from elixir.memory.disk import DiskStore

READ_AHEAD = 2
"""Disk chunks whose regions are read ahead of their update (the pool has two buffers more: one being
updated, one being written)."""


def disk_state_tensors(optimizer_class: type, groups: list[dict]) -> int:
    """Shard-sized optimizer states per chunk: the sections of a disk region. ValueError for an optimizer
    whose states the disk tier does not know."""
    if optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
        return 3 if any(g.get("amsgrad") for g in groups) else 2
    if optimizer_class is torch.optim.SGD:
        return 1 if any(g.get("momentum") for g in groups) else 0
    raise ValueError(
        f"optim_home='disk' with {optimizer_class.__name__}: the disk tier keeps the states of Adam, AdamW and "
        "SGD; use one of them, or keep this optimizer's chunks on the device or the host"
    )


class DiskChunks:
    """The disk chunks of one optimizer: their regions in and out of memory."""

    def __init__(self, opt, store: DiskStore) -> None:
        self.opt = opt
        self.store = store
        self._reads: dict[int, Future] = {}  # regions requested and not yet used, by chunk index

    # --- reading ahead ----------------------------------------------------------------------------------

    def request(self, chunk: Chunk) -> None:
        if chunk.index not in self._reads:
            self._reads[chunk.index] = self.store.read(chunk)

    def read_ahead(self, order: list[Chunk]) -> None:
        """Request the regions of the first READ_AHEAD chunks of `order` that are not requested yet, as long
        as fewer than READ_AHEAD requested regions wait to be used."""
        for chunk in order:
            if len(self._reads) >= READ_AHEAD:
                return
            self.request(chunk)

    def claim(self, chunk: Chunk) -> Future:
        """The read of `chunk`'s region (requested now if it was not): its future gives the buffer. Reads
        are requested and claimed on the main thread only; an update on the worker waits on the future."""
        self.request(chunk)
        return self._reads.pop(chunk.index)

    def take(self, chunk: Chunk) -> torch.Tensor:
        """The buffer holding `chunk`'s region (read now if it was not requested)."""
        return self.claim(chunk).result()

    def drop_reads(self) -> None:
        """Give back the buffers of regions read ahead and not used (the step went another way)."""
        for f in self._reads.values():
            self.store.give_back(f.result())
        self._reads.clear()

    # --- a region in memory -------------------------------------------------------------------------------

    def states(self, chunk: Chunk) -> list[torch.Tensor]:
        """The chunk's shard-sized optimizer states, in region order (sorted by name)."""
        st = self.opt.state.get(chunk.master, {})
        return [st[k] for k in sorted(st) if torch.is_tensor(st[k]) and st[k].shape == chunk.master.shape]

    def attach(self, chunk: Chunk, buf: torch.Tensor, log: torch.Tensor | None = None) -> None:
        self.store.attach(chunk, buf, self.states(chunk), log)

    def adopt(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """States the update (or a checkpoint load) made in fresh memory move into the region."""
        _, views, _ = self.store.sections(chunk, buf)
        states = self.states(chunk)
        assert len(states) <= len(views), f"chunk {chunk.index} has more optimizer states than its disk region"
        for t, view in zip(states, views):
            if t.data_ptr() != view.data_ptr():
                view.copy_(t)
                t.set_(view.untyped_storage(), view.storage_offset(), view.shape, (1,))

    def release(self, chunk: Chunk, buf: torch.Tensor, log: torch.Tensor | None = None, *, after=None) -> Future:
        """Park the chunk again and write its region back; the buffer returns to the pool once written."""
        self.adopt(chunk, buf)
        self.store.detach(chunk, self.states(chunk), log)
        return self.store.write(chunk, buf, after=after)

    @contextmanager
    def loaded(self, chunk: Chunk, *, write_back: bool = False, log: torch.Tensor | None = None,
               wait: bool = True):
        """The chunk's master, states (and log) in memory for the body; written back when `write_back`
        (waiting for the write when `wait`: a later read of the region waits for it anyway)."""
        buf = self.take(chunk)
        self.attach(chunk, buf, log)
        try:
            yield buf
        finally:
            if write_back:
                written = self.release(chunk, buf, log)
                if wait:
                    written.result()
            else:
                self.store.detach(chunk, self.states(chunk), log)
                self.store.give_back(buf)
