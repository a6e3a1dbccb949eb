"""Disk as a tier: the fp32 masters and optimizer states of chunks whose `optim_home` is "disk" live in one
preallocated scratch file per rank and pass through a bounded pool of host buffers when they are updated.

[Note: the disk tier]
A disk chunk owns a region of its rank's scratch file: its fp32 master, its optimizer's shard-sized states
(AdamW: two) and, when its update can run inside backward, its rollback log (the gradient in the compute
dtype: see [Note: the step inside backward] in elixir/optim/overlap.py), each section aligned to 4 KiB.
Between updates the master and those states are *parked*: tensors of their shape over a reserved,
never-touched address range (so they hold no memory, and reading one gives zeros, not another chunk's
values), while the optimizer's own state dict, step counts included, stays as it is. An update reads the
region into a pool buffer (`read`, ahead of use), points the tensors at it (`attach`), runs, and writes
the region back behind (`write`); the buffer returns to the pool when the write is done.

Why threads and O_DIRECT, not io_uring or mmap: Python has no io_uring in its standard library, and the
transfers are few and large (one region, megabytes to a gigabyte, per chunk and step), where a thread per
request in `os.preadv`/`os.pwritev` (the GIL is released) reaches the device's sequential bandwidth.
O_DIRECT keeps the page cache out: without it every state byte read or written would also sit in the
kernel's cache, the very host memory the tier exists to free. Filesystems that refuse O_DIRECT (tmpfs,
some network filesystems) get buffered I/O with `posix_fadvise(DONTNEED)` after each transfer. The file
is preallocated whole (`posix_fallocate`), so running out of space can only happen before training
starts, where it is a clear error, never in the middle of a step.

The file is locked (`flock`) while its owner lives: a second run on the same folder is refused, and a
file left by a run that died is recognised (no lock), reported in one line, and reused from scratch. It
is deleted when the model goes or the process exits normally. Its name, `elixir-scratch-...`, is never
a checkpoint's (checkpoints are folders with a manifest).
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import sys
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from elixir.memory.chunk import Chunk
from elixir.memory.tracker import MemoryTracker

ALIGN = 4096
"""Alignment of regions, sections, transfers and buffers: what O_DIRECT needs on common filesystems."""
DISK_BUFFERS = 4
"""Host buffers of the largest region: two reads ahead of the update that uses one, one written behind.
The cost model reads this constant too."""


class DiskError(RuntimeError):
    """The scratch folder cannot hold or serve the disk tier; the message names the path and the fix."""


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def region_bytes(shard_numel: int, state_tensors: int, log_itemsize: int) -> int:
    """Bytes of one disk chunk's region: master and states in fp32, and the log (0: none)."""
    fp32 = _round_up(shard_numel * 4)
    return fp32 * (1 + state_tensors) + (_round_up(shard_numel * log_itemsize) if log_itemsize else 0)


def scratch_name(rank: int, world: int) -> str:
    return f"elixir-scratch-rank{rank}-of-{world}.bin"


class DiskStore:
    """One rank's scratch file, its regions, the buffer pool and the I/O threads."""

    def __init__(self, folder: str, chunks: list[Chunk], tracker: MemoryTracker, *, rank: int, world: int,
                 state_tensors: int, log_dtype: torch.dtype | None, pin: bool) -> None:
        self.chunks = {c.index: c for c in chunks}
        self.state_tensors = state_tensors
        self.log_dtype = log_dtype
        self.tracker = tracker
        log_itemsize = log_dtype.itemsize if log_dtype is not None else 0
        self.offsets: dict[int, int] = {}
        end = 0
        for c in chunks:
            self.offsets[c.index] = end
            end += region_bytes(c.shard_numel, state_tensors, log_itemsize)
        self.file_bytes = end
        self.region_max = max(region_bytes(c.shard_numel, state_tensors, log_itemsize) for c in chunks)
        self.path = os.path.join(folder, scratch_name(rank, world))
        self.fd, self.direct = _open_scratch(self.path, self.file_bytes)
        tracker.count("disk", self.file_bytes)
        # the pool: aligned host buffers (pinned on CUDA, where gradients and shards cross from them)
        self._pool: queue.Queue = queue.Queue()
        self._buffers = []
        for _ in range(DISK_BUFFERS):
            raw = tracker.empty(self.region_max + ALIGN, torch.uint8, "host", pin=pin)
            skip = (-raw.data_ptr()) % ALIGN
            buf = raw[skip : skip + self.region_max]
            self._buffers.append(raw)
            self._pool.put(buf)
        # parking: an address range as large as the largest section, reserved and never touched
        largest = max(c.shard_numel for c in chunks) * 4
        self._parking = torch.UntypedStorage(largest)
        # one thread reads, one writes: a read waits for a free buffer, which only a write gives back
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elixir-disk-read")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elixir-disk-write")
        self.reads = self.writes = 0
        self.bytes_read = self.bytes_written = 0
        self._writing: dict[int, Future] = {}  # chunk index -> its last write: a read of the region waits for it
        self._finalizer = weakref.finalize(self, _close_scratch, self.fd, self.path, (self._reader, self._writer))

    # --- layout ---------------------------------------------------------------------------------------

    def sections(self, chunk: Chunk, buf: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """(master, states, log) views of `buf` holding `chunk`'s region."""
        n = chunk.shard_numel
        fp32 = _round_up(n * 4)
        master = buf[:fp32].view(torch.float32)[:n]
        states = [buf[fp32 * (i + 1) : fp32 * (i + 2)].view(torch.float32)[:n] for i in range(self.state_tensors)]
        log = None
        if self.log_dtype is not None:
            start = fp32 * (1 + self.state_tensors)
            log = buf[start : start + _round_up(n * self.log_dtype.itemsize)].view(self.log_dtype)[:n]
        return master, states, log

    def _region(self, chunk: Chunk, buf: torch.Tensor) -> tuple[int, torch.Tensor]:
        size = region_bytes(chunk.shard_numel, self.state_tensors,
                            self.log_dtype.itemsize if self.log_dtype is not None else 0)
        return self.offsets[chunk.index], buf[:size]

    # --- parking ----------------------------------------------------------------------------------------

    def park(self, t: torch.Tensor) -> None:
        """Point `t` (a master, state or log of a disk chunk) at the parking range: no memory."""
        t.set_(self._parking, 0, t.shape, (1,))

    def parked(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(0, dtype=dtype)
        t.set_(self._parking, 0, (numel,), (1,))
        return t

    # --- transfers --------------------------------------------------------------------------------------

    def take_buffer(self) -> torch.Tensor:
        return self._pool.get()

    def give_back(self, buf: torch.Tensor) -> None:
        self._pool.put(buf)

    def read(self, chunk: Chunk) -> Future:
        """Read `chunk`'s region into a pool buffer; the future gives the buffer. The reader thread waits
        for a free buffer, the caller does not."""
        self.reads += 1

        writing = self._writing.get(chunk.index)

        def job():
            if writing is not None:
                writing.result()  # the region's last write has landed
            buf = self.take_buffer()
            offset, view = self._region(chunk, buf)
            self.bytes_read += view.numel()
            try:
                return self._transfer(os.preadv, offset, view, buf)
            except BaseException:
                self.give_back(buf)
                raise

        return self._reader.submit(job)

    def write(self, chunk: Chunk, buf: torch.Tensor, *, then_release: bool = True, after=None) -> Future:
        """Write `chunk`'s region from `buf`; the buffer goes back to the pool once written (and once the
        CUDA event `after`, a copy out of it, is done)."""
        offset, view = self._region(chunk, buf)
        self.writes += 1
        self.bytes_written += view.numel()

        def job():
            try:
                if after is not None:
                    after.synchronize()
                self._transfer(os.pwritev, offset, view, buf)
            finally:
                if then_release:
                    self.give_back(buf)
            return buf

        future = self._writer.submit(job)
        self._writing[chunk.index] = future
        return future

    def _transfer(self, op, offset: int, view: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        mem = memoryview(view.numpy()).cast("B")
        done = 0
        while done < len(mem):
            try:
                n = op(self.fd, [mem[done:]], offset + done)
            except OSError as e:
                raise DiskError(_io_error(e, self.path, op is os.pwritev)) from e
            if n <= 0:
                raise DiskError(f"{self.path}: {'write' if op is os.pwritev else 'read'} of {len(mem)} bytes at "
                                f"{offset} stopped after {done}; the scratch file is damaged or the disk failed")
            done += n
        if not self.direct:
            os.posix_fadvise(self.fd, offset, len(mem), os.POSIX_FADV_DONTNEED)
        return buf

    # --- a chunk in memory for a while --------------------------------------------------------------------

    def attach(self, chunk: Chunk, buf: torch.Tensor, states: list[torch.Tensor], log: torch.Tensor | None) -> None:
        """Point the chunk's master, its shard-sized optimizer states (in their order) and log at `buf`."""
        master, state_views, log_view = self.sections(chunk, buf)
        chunk.master.set_(master.untyped_storage(), master.storage_offset(), master.shape, (1,))
        for t, v in zip(states, state_views):
            t.set_(v.untyped_storage(), v.storage_offset(), v.shape, (1,))
        if log is not None and log_view is not None:
            log.set_(log_view.untyped_storage(), log_view.storage_offset(), log_view.shape, (1,))

    def detach(self, chunk: Chunk, states: list[torch.Tensor], log: torch.Tensor | None) -> None:
        self.park(chunk.master)
        for t in states:
            self.park(t)
        if log is not None:
            self.park(log)

    def stats(self) -> dict:
        return {"disk_reads": self.reads, "disk_writes": self.writes, "disk_bytes_read": self.bytes_read,
                "disk_bytes_written": self.bytes_written}

    def close(self) -> None:
        self._finalizer()


def _open_scratch(path: str, nbytes: int) -> tuple[int, bool]:
    """Create, lock and preallocate the scratch file; (fd, opened with O_DIRECT)."""
    folder = os.path.dirname(path)
    stale = os.path.exists(path)
    flags = os.O_RDWR | os.O_CREAT
    direct = hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)
    except OSError as e:
        if direct and e.errno == errno.EINVAL:  # the filesystem refuses O_DIRECT
            direct = False
            fd = os.open(path, flags, 0o600)
        else:
            raise DiskError(f"cannot create the scratch file {path}: {e.strerror}; pass a folder you can write to "
                            "(elixir.wrap(..., disk=...), elixir train --disk)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DiskError(f"{path} is in use by a run that is still going (another process, or another wrapped "
                        "model of this one); give each its own scratch folder") from None
    if stale:
        print(f"elixir: {path} was left by a run that did not finish; it is reused from scratch", file=sys.stderr)
    try:
        os.ftruncate(fd, 0)
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        free = _free_bytes(folder)
        _close_scratch(fd, path, None)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskError(f"{folder} has {free:,} bytes free but the disk tier needs {nbytes:,} "
                            f"({nbytes / 2**30:.2f} GiB) for {os.path.basename(path)}; free space, choose "
                            "another folder, or plan with less on disk") from None
        raise DiskError(f"cannot preallocate {nbytes:,} bytes for {path}: {e.strerror}") from None
    return fd, direct


def _free_bytes(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _io_error(e: OSError, path: str, writing: bool) -> str:
    what = "writing to" if writing else "reading from"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what} {path}: no space left ({e.strerror}); the scratch file was preallocated, so another " \
               "process filled its filesystem; free space and resume from the last checkpoint"
    return f"{what} {path}: {e.strerror} (errno {e.errno}); check the disk, then resume from the last checkpoint"


def _close_scratch(fd: int, path: str, pools) -> None:
    for pool in pools or ():
        pool.shutdown(wait=True)
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


def check_scratch_folder(folder: str, nbytes: int) -> None:
    """ValueError naming the folder, the bytes needed and available, before anything is allocated."""
    if not folder:
        raise ValueError("chunks with optim_home='disk' need a scratch folder: elixir.wrap(..., disk=PATH) or "
                         "elixir train --disk PATH")
    if not os.path.exists(folder):
        try:
            os.makedirs(folder)
        except OSError as e:
            raise ValueError(f"disk={folder!r} does not exist and cannot be made ({e.strerror}); pass a folder "
                             "you can write to") from None
    if not os.path.isdir(folder):
        raise ValueError(f"disk={folder!r} is not a folder; pass a folder (it is made if missing)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"disk={folder!r} is not writable; pass a folder you can write to")
    free = _free_bytes(folder)
    if free < nbytes:
        raise ValueError(f"disk={folder!r} has {free:,} bytes free ({free / 2**30:.2f} GiB) but the plan's disk "
                         f"chunks need {nbytes:,} ({nbytes / 2**30:.2f} GiB); free space, choose another folder, "
                         "or plan with less on disk")
