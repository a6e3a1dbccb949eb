"""Gradients of a wrapped model: per-chunk fp32 buffers, their reduction over the chunk's group, and the
master gradients at each chunk's optimizer home.

A parameter's gradient is put into its chunk's buffer as autograd accumulates it (`add`); when every
gradient of the chunk has arrived the buffer is reduce-scattered into this rank's shard and added into
the master's gradient where the optimizer state lives.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import torch

from elixir import accel, comm
from elixir.memory import REDUCTIONS_IN_FLIGHT, Chunk, MemoryTracker
from elixir.optim.overlap import chunk_norm


class GradReducer:
    """The gradient buffers of one wrapped model and their reductions."""

    def __init__(
        self, chunks: list[Chunk], tracker: MemoryTracker, device: torch.device, *,
        on_reduce: Callable[[Chunk], None] = lambda chunk: None,
    ) -> None:
        self.chunks = chunks
        self.tracker = tracker
        self.device = device
        self.on_reduce = on_reduce  # a chunk's gradients are complete (its recompute pin may go)
        self._reductions: list = []
        self._grad_pool: list[torch.Tensor] = []
        # id(pooled buffer) -> the peers' reads of it, still in flight ([Note: shared memory between ranks])
        self._peers_reading: dict[int, comm.Pending] = {}
        self._grad_buffer_numel = max(c.numel for c in chunks)
        self.grad_buffers = 0  # pooled gradient buffers made so far (see [Note: gradient buffers])
        # reduce-scatters left in flight during backward, each holding a full-chunk fp32 buffer
        self.max_reductions_in_flight = REDUCTIONS_IN_FLIGHT
        self.first_backward_counts: dict[int, int] | None = None
        self._kept_host_grads: dict[int, torch.Tensor] = {}  # chunk index -> kept host gradient buffer (pinned on CUDA)
        self._copying: dict[int, object] = {}  # id(pooled buffer) -> CUDA event: its copy to the host is done
        self._staging: queue.Queue = queue.Queue()
        self.staging_wait_s = 0.0  # backward's waits for a free staging buffer, cumulative
        self.staging_buffers = 0
        self.speculation = None  # the optimizer's update inside backward (elixir/optim/overlap.py), if any

    @property
    def grad_buffer_bytes(self) -> int:
        return self.grad_buffers * self._grad_buffer_numel * 4

    @property
    def host_grad_bytes(self) -> int:
        """Bytes of the host gradient buffers kept from step to step (see `_host_grad`): they stay after
        zero_grad, like memory a caching allocator keeps, and are counted under the host."""
        return sum(b.numel() * b.element_size() for b in self._kept_host_grads.values())

    # [Note: gradient buffers]
    # A chunk's gradient is gathered in an fp32 buffer of the whole chunk, taken from a pool of
    # buffers of the largest chunk's size: allocated once and reused, since a fresh zero-filled
    # buffer per chunk per step costs an allocation (page faults on the CPU) and a fill. The first
    # gradient of a parameter is copied in and later ones added, so the buffer is never zeroed
    # whole: only the ranges no gradient reached (padding, alignment gaps, unused parameters) are
    # zeroed before the reduction. Pooled buffers stay allocated, and counted, until the model goes.

    def _take_grad_buffer(self) -> torch.Tensor:
        if self._grad_pool:
            buf = self._grad_pool.pop()
            peers_reading = self._peers_reading.pop(id(buf), None)
            if peers_reading is not None:  # it was a reduction's source: the peers have read it
                peers_reading.wait()
            copied = self._copying.pop(id(buf), None)
            if copied is not None:  # its gradient was still being copied to the host (CUDA)
                torch.cuda.current_stream(self.device).wait_event(copied)
            return buf
        self.grad_buffers += 1
        return self.tracker.empty(self._grad_buffer_numel, torch.float32, "device", share=True)

    def give_back_grad_buffer(self, buf: torch.Tensor, peers_reading=None, *, copied=None) -> None:
        """Return `buf` to the pool; `peers_reading`: a collective to wait before it is written again;
        `copied`: a CUDA event after which a copy out of it is done."""
        self._grad_pool.append(buf)
        if peers_reading is not None:
            self._peers_reading[id(buf)] = peers_reading
        if copied is not None:
            self._copying[id(buf)] = copied

    def add(self, chunk: Chunk, slot: int, grad: torch.Tensor) -> None:
        """Put a parameter's gradient into its chunk's fp32 gradient buffer; reduce when complete."""
        if chunk.grad_buffer is None:
            chunk.grad_buffer = self._take_grad_buffer()
            chunk.grad_written = [False] * len(chunk.slots)
            chunk.slots_written = 0
        offset = chunk.slots[slot].offset
        dst = chunk.grad_buffer[offset : offset + grad.numel()].view_as(grad)
        if chunk.grad_written[slot]:
            dst.add_(grad)
        else:
            dst.copy_(grad)
            chunk.grad_written[slot] = True
            chunk.slots_written += 1
        chunk.grads_seen += 1
        if self.first_backward_counts is not None:
            self.first_backward_counts[chunk.index] = self.first_backward_counts.get(chunk.index, 0) + 1
        # complete: every trainable parameter has its gradient, as many times as a backward gives it
        # (more than once only when autograd runs its accumulation twice, e.g. reentrant checkpointing)
        if chunk.slots_written == chunk.trainable_slots and (
            chunk.expected_grads is None or chunk.grads_seen >= chunk.expected_grads
        ):
            self.reduce_grad(chunk)

    def reduce_grad(self, chunk: Chunk) -> None:
        """Reduce the chunk's gradient buffer over its group into the fp32 gradient shard of the
        master, at the optimizer's home. Later gradients of the same backward start a new buffer,
        so reducing early is never wrong, only slower. On several ranks the reduce-scatter is left
        in flight while backward goes on; `finish_reductions` completes it."""
        base = chunk.grad_buffer
        chunk.grad_buffer, chunk.grads_seen = None, 0
        self.on_reduce(chunk)
        buf = base[: chunk.numel]
        end = 0
        for s, written in zip(chunk.slots, chunk.grad_written):
            if s.offset > end:
                buf[end : s.offset].zero_()
            if not written:
                buf[s.offset : s.offset + s.numel].zero_()
            end = s.offset + s.numel
        if end < chunk.numel:
            buf[end:].zero_()
        if chunk.group.size == 1 and (chunk.group.replicas is None or chunk.group.replicas.size == 1):
            if chunk.group.grad_divisor != 1:  # an expert held by this rank alone: mean over the world
                buf.div_(chunk.group.grad_divisor)
            self._add_to_master(chunk, buf, base)
            return
        reduced = self.tracker.empty(chunk.shard_numel, torch.float32, "device")
        pending = comm.reduce_scatter_mean(
            reduced, buf, chunk.group, what=f"reduce-scatter of chunk {chunk.index}'s gradients", async_op=True,
            arena=self.tracker.shared, defer_done=True,
        )
        self._reductions.append((chunk, base, reduced, pending))
        if len(self._reductions) > self.max_reductions_in_flight:
            self._finish_reduction(*self._reductions.pop(0))

    def finish_reductions(self) -> None:
        while self._reductions:
            self._finish_reduction(*self._reductions.pop(0))

    def _finish_reduction(self, chunk: Chunk, base, reduced, pending) -> None:
        pending.wait()
        self.give_back_grad_buffer(base, pending.trailing)
        self._add_to_master(chunk, reduced, None)

    def _add_to_master(self, chunk: Chunk, reduced: torch.Tensor, base: torch.Tensor | None) -> None:
        """Hand a reduced gradient shard on: to the chunk's update when it runs during this backward (see
        [Note: the step inside backward] in elixir/optim/overlap.py), else into the master's gradient.
        `base` is the pooled buffer that `reduced` is a view of (one rank), or None when `reduced` was
        allocated for it."""
        spec = self.speculation
        if spec is not None and spec.active:
            if spec.late(chunk):
                pass  # its update was undone and its gradient held: accumulate, and step() updates it
            elif spec.speculates_on(chunk):
                self._speculate(spec, chunk, reduced, base)
                return
            self._into_master_grad(chunk, reduced, base)  # no update of it follows in this backward: added here
            return
        self._into_master_grad(chunk, reduced, base, on_worker=True)

    def _speculate(self, spec, chunk: Chunk, reduced: torch.Tensor, base: torch.Tensor | None) -> None:
        if chunk.master.grad is None and spec.logs_directly(chunk):
            log = spec.logs[chunk.index]
            accel.copy_(log, reduced)
            self._done_with(reduced, base)
            spec.submit(chunk, log, logged=True)
            return
        if chunk.master.grad is None and chunk.index in spec.logs:
            # a host chunk's gradient passes through a staging buffer that its update gives back
            staging = self.take_staging()
            log, flag, norm = spec.copied_down(chunk)
            ready = stage_gradient(reduced, staging, spec.d2h_stream, log=log, finite=flag, cast=spec.log_cast,
                                   norm=norm, norm_type=spec.norm_type or 2.0)
            self._done_with(reduced, base, ready, spec.d2h_stream)
            spec.submit(chunk, staging[: chunk.shard_numel], staging=staging, ready=ready, log_copied=log is not None,
                        checked=flag, normed=norm)
            return
        self._into_master_grad(chunk, reduced, base, on_worker=True)  # it stays as the master's .grad
        spec.submit(chunk, chunk.master.grad)  # after the add, on the worker

    def _done_with(self, reduced: torch.Tensor, base: torch.Tensor | None, copied=None, stream=None) -> None:
        """`reduced` is no longer needed (`copied`: a CUDA event after which its copy on `stream` is done)."""
        if base is not None:
            self.give_back_grad_buffer(base, copied=copied)
        else:
            if stream is not None:  # the allocator reuses its memory only after that stream's copy
                reduced.record_stream(stream)
            self.tracker.release(reduced, "device")

    def _into_master_grad(self, chunk: Chunk, reduced: torch.Tensor, base: torch.Tensor | None, *,
                          on_worker: bool = False) -> None:
        """Add a reduced gradient shard into the master's gradient; `on_worker`: a host chunk's add may run on the
        optimizer's worker (see [Note: accumulating on the worker] in elixir/optim/overlap.py)."""
        master = chunk.master
        if chunk.optim_home == "device":
            if master.grad is None:
                master.grad = reduced  # adopt it: no copy
                chunk.master_grad_base = base
            else:
                master.grad.add_(reduced)
                self._done_with(reduced, base)
            return
        if master.grad is None and base is None and reduced.device == master.device:
            # a CPU-only machine: host and device are the same memory, so the reduced shard becomes
            # the host gradient as it is (counted under the host from now on), with no copy
            master.grad = reduced
            nbytes = reduced.numel() * reduced.element_size()
            self.tracker.count("device", -nbytes)
            self.tracker.count("host", nbytes)
            return
        spec = self.speculation
        if master.grad is None:
            master.grad = self._host_grad(chunk)
            accel.copy_(master.grad, reduced)
        elif on_worker and spec is not None and spec.accumulates_on_worker(chunk):
            staging = self.take_staging()
            ready = stage_gradient(reduced, staging, spec.d2h_stream)
            self._done_with(reduced, base, ready, spec.d2h_stream)
            spec.accumulate(chunk, staging, ready)
            return
        elif reduced.device == master.grad.device or not self.staging_buffers:
            master.grad.add_(reduced.to(master.grad.device))
        else:  # across to the host through a staging buffer, then added there
            staging = self.take_staging()
            stage_gradient(reduced, staging, None)
            accel.synchronize(self.device)
            master.grad.add_(staging[: chunk.shard_numel])
            self.give_staging(staging)
        self._done_with(reduced, base)

    # --- staging ----------------------------------------------------------------------------------

    def make_staging(self, count: int, numel: int) -> None:
        """`count` host buffers of `numel` fp32 elements (pinned on CUDA), allocated once, that host
        chunks' gradients cross to the host through (see [Note: the step inside backward])."""
        for _ in range(count):
            self._staging.put(self.tracker.empty(numel, torch.float32, "host", pin=True))
        self.staging_buffers += count

    def take_staging(self) -> torch.Tensor:
        """A free staging buffer; waits for an update to give one back when all are in use (the wait is
        counted: `step_stats`' staging_wait_s)."""
        try:
            return self._staging.get_nowait()
        except queue.Empty:
            pass
        started = time.perf_counter()
        try:
            while True:
                try:
                    return self._staging.get(timeout=0.5)
                except queue.Empty:
                    if self.speculation is not None:
                        self.speculation.raise_failures()  # a failed update never gives its buffer back
        finally:
            self.staging_wait_s += time.perf_counter() - started

    def give_staging(self, buf: torch.Tensor) -> None:
        self._staging.put(buf)  # thread-safe: updates on the worker give buffers back

    def hold_host_grad(self, chunk: Chunk) -> torch.Tensor:
        """A host buffer to hold a chunk's fp32 gradient in for once (an update inside backward was given
        back): freed by zero_grad, unlike `_host_grad`'s, since the chunk normally holds none."""
        return self.tracker.empty(chunk.shard_numel, torch.float32, "host")

    def _host_grad(self, chunk: Chunk) -> torch.Tensor:
        """The host buffer a chunk's gradient shard is copied into, kept from step to step: a fresh buffer
        per step costs an allocation and its page faults on the CPU (measured: 5-31k faults and 4x the copy
        time per step of a 50M model), and on CUDA pinning gigabytes costs seconds, every time (pinned
        there, so the copy is asynchronous)."""
        buf = self._kept_host_grads.get(chunk.index)
        if buf is None:
            buf = self._kept_host_grads[chunk.index] = self.tracker.empty(
                chunk.shard_numel, torch.float32, "host", pin=True
            )
        return buf

    def drop_master_grad(self, chunk: Chunk) -> None:
        """Free the master's gradient (zero_grad(set_to_none=True)); a kept host buffer stays."""
        g = chunk.master.grad
        if g is None:
            return
        if chunk.master_grad_base is not None:
            self.give_back_grad_buffer(chunk.master_grad_base)
            chunk.master_grad_base = None
        elif self._kept_host_grads.get(chunk.index) is not g:
            self.tracker.release(g, "device" if chunk.optim_home == "device" else "host")
        chunk.master.grad = None

    def reduce_leftovers(self) -> None:
        """At the end of a backward: reduce chunks some of whose gradients never came, finish every
        reduction, and learn the gradient counts in the first backward."""
        for c in self.chunks:
            if c.grad_buffer is not None:
                self.reduce_grad(c)
        self.finish_reductions()

    def learn_counts(self) -> None:
        if self.first_backward_counts is not None:
            for c in self.chunks:
                c.expected_grads = self.first_backward_counts.get(c.index) or None
            self.first_backward_counts = None

    def wait_peers(self) -> None:
        """The peers have read every pooled buffer this rank lent them."""
        for peers_reading in self._peers_reading.values():
            peers_reading.wait()
        self._peers_reading.clear()


def stage_gradient(reduced: torch.Tensor, staging: torch.Tensor, stream, *, log: torch.Tensor | None = None,
                   finite: torch.Tensor | None = None, cast: torch.Tensor | None = None,
                   norm: torch.Tensor | None = None, norm_type: float = 2.0) -> object:
    """Copy a reduced gradient shard into a staging buffer, and into `log` (cast), whether it is finite into
    `finite` (one bool) and its `norm_type` norm into `norm` (one fp32) if given: on the CPU at once; on CUDA on
    `stream` after the compute stream's work (`log`, `finite` and `norm` pinned, the check and the norm on the
    device, the cast there a tile at a time through `cast`, a device buffer of the log's dtype that only this
    stream uses), returning the event the update waits for."""
    dst = staging[: reduced.numel()]
    if stream is None:
        accel.copy_(dst, reduced)
        if log is not None:
            log.copy_(reduced)
        if finite is not None:
            finite.copy_(torch.isfinite(reduced.sum(dtype=torch.float32)).view(1))
        if norm is not None:
            norm.copy_(chunk_norm(reduced, norm_type).view(1))
        return None
    stream.wait_stream(torch.cuda.current_stream(reduced.device))
    with torch.cuda.stream(stream):
        dst.copy_(reduced, non_blocking=True)
        if log is not None and log.dtype == reduced.dtype:
            log.copy_(reduced, non_blocking=True)
        elif log is not None:
            accel.through_tiles(log, reduced, cast, log.dtype)
        if finite is not None:  # as the worker's check: a NaN or inf anywhere makes the (fp32) sum one
            finite.copy_(torch.isfinite(reduced.sum(dtype=torch.float32)).view(1), non_blocking=True)
        if norm is not None:  # as the worker's norm for a clip (`chunk_norm`), over the same fp32 values
            norm.copy_(chunk_norm(reduced, norm_type).view(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return event
