"""Buffers in shared memory, so that ranks on one host move chunks by reading each other's memory.

[Note: shared memory between ranks]
On the CPU, gloo moves every byte through a loopback TCP socket: copies into and out of the kernel
on both sides, which costs as much CPU time as the sender's compute would have used. When all the
ranks of a group are processes of one host, the runtime's communication buffers (the resident
chunks, the cache blocks and the pooled gradient buffers) are allocated in anonymous shared memory
(`memfd_create`) that every rank of the group maps, and a collective becomes:

  1. a tiny gloo all-gather of where each rank's source lies (segment, offset): it completes when
     every rank has written its source, so it is the "ready" signal, and it can stay in flight;
  2. at the wait: read the peers' slices directly (a sum for a reduce-scatter, in rank order; a
     copy for an all-gather);
  3. a tiny blocking all-reduce: every rank has finished reading, so each may write its source
     again as soon as its own wait returns (the same rule as for any collective in flight).

Failures keep the gloo semantics: a dead or hung peer fails the signals, which name the collective.
Segments are mapped through `/proc/<pid>/fd/<fd>`; they live while their owner holds the buffer
and, for the peers, while the arena (one per wrapped model) lives. Nothing is left behind when the
processes exit, however they exit. `ELIXIR_SHM=0` turns this off; so does a group whose ranks are
on several hosts, or a host that does not let one process map another's memory (checked once,
every rank agreeing).
"""

from __future__ import annotations

import itertools
import os
import socket
import weakref

import torch
import torch.distributed as dist

from elixir.memory.chunk import ChunkGroup

_ids = itertools.count()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _map(pid: int, fd: int, nbytes: int) -> torch.Tensor:
    return torch.from_file(f"/proc/{pid}/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)


class SharedArena:
    """Shared-memory buffers of this rank, and the peers' buffers this rank has mapped."""

    def __init__(self, group: ChunkGroup, pids: list[int]) -> None:
        self.group = group
        self.pids = pids
        # storage address -> (segment id, fd, bytes, closer of the fd when the storage is freed)
        self._segments: dict[int, tuple[int, int, int, weakref.finalize]] = {}
        self._peers: dict[tuple[int, int], torch.Tensor] = {}  # (rank, segment id) -> mapping

    @classmethod
    def create(cls, group: ChunkGroup, node: int | None = None) -> SharedArena | None:
        """Collective over `group`: an arena when every rank can map the others' memory, else None.
        `node`: this rank's node as the launcher numbers them (torchrun's GROUP_RANK), when known: ranks
        of different nodes never share an arena, even on one host (see [Note: hierarchical sharding] in
        elixir/parallel/nodes.py)."""
        if group.size == 1 or not hasattr(os, "memfd_create") or dist.get_backend(group.process_group) != "gloo":
            return None
        wanted = os.environ.get("ELIXIR_SHM", "1") != "0"
        probe_fd = os.memfd_create("elixir-probe") if wanted else -1
        if probe_fd >= 0:
            os.ftruncate(probe_fd, 8)
        me = (socket.gethostname(), _boot_id(), os.getpid(), probe_fd, wanted, node)
        everyone: list = [None] * group.size
        dist.all_gather_object(everyone, me, group=group.process_group)
        ok = all(e[4] for e in everyone) and len({(e[0], e[1], e[5]) for e in everyone}) == 1
        if ok:
            try:
                for r, (_, _, pid, fd, _, _) in enumerate(everyone):
                    if r != group.rank:
                        _map(pid, fd, 8)
            except (RuntimeError, OSError):
                ok = False
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.process_group)  # every rank agrees
        if probe_fd >= 0:
            os.close(probe_fd)
        if not flag.item():
            return None
        return cls(group, [e[2] for e in everyone])

    def serves(self, group: ChunkGroup) -> bool:
        return group.process_group is self.group.process_group

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled buffer in shared memory (fresh pages of a memfd are zeros)."""
        nbytes = max(numel * dtype.itemsize, 1)
        fd = os.memfd_create(f"elixir-{os.getpid()}")
        os.ftruncate(fd, nbytes)
        base = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)
        storage = base.untyped_storage()
        ptr = storage.data_ptr()
        # the descriptor (which peers open) lives as long as any view of the buffer does
        closer = weakref.finalize(storage, self._forget, self._segments, ptr, fd)
        self._segments[ptr] = (next(_ids), fd, nbytes, closer)
        return base.view(dtype)[:numel]

    @staticmethod
    def _forget(segments: dict, ptr: int, fd: int) -> None:
        if ptr in segments and segments[ptr][1] == fd:
            del segments[ptr]
        os.close(fd)

    def locate(self, t: torch.Tensor) -> list[int]:
        """[segment id, fd, segment bytes, byte offset] of `t` in this rank's memory; [-1, 0, 0, 0] if
        it is not in shared memory."""
        ptr = t.untyped_storage().data_ptr()
        seg = self._segments.get(ptr)
        if seg is None or not t.is_contiguous():
            return [-1, 0, 0, 0]
        return [seg[0], seg[1], seg[2], t.data_ptr() - ptr]

    def peer(self, rank: int, where: list[int], numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The peer's tensor of `numel` elements at `where` (from its `locate`)."""
        seg_id, fd, nbytes, offset = where
        mapped = self._peers.get((rank, seg_id))
        if mapped is None:
            mapped = self._peers[(rank, seg_id)] = _map(self.pids[rank], fd, nbytes)
        return mapped[offset : offset + numel * dtype.itemsize].view(dtype)

    def close(self) -> None:
        for *_, closer in list(self._segments.values()):
            closer()  # runs once: a later collection of the storage does nothing
        self._peers.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
