"""The optimizer step inside backward: each chunk is updated as soon as its gradient is final.

[Note: the step inside backward]
A chunk's reduced gradient shard is final long before backward ends: its update can run then, host
chunks on a worker thread, device chunks on a side stream (on the CPU the worker runs both), so the
optimizer hides behind the rest of backward instead of following it. Three things are not known then,
so the update is a speculation, checked after backward by `ElixirOptimizer`:
- the gradient-norm clip, whose coefficient needs every chunk's norm: speculated not to act. A step runs
  its updates inside backward only when the previous step's clip did not act (or there was none): a
  coefficient below 1 is a new value every step, so guessing it would be wrong every time, and a wrong
  guess costs more than no guess (undo and redo on the critical path, against the update after backward).
  So a run whose clip keeps acting updates after backward, as without overlap, and speculates again once
  a clip lets a step through unchanged; `step_stats` counts those steps (`clip_pauses`). The runtime
  learns the norm type and whether the clip acted from the `clip_grad_norm_` calls; nothing is declared
  up front. Where the clip after backward acts on a speculated step, every update is undone (undo.py)
  and redone with the gradient times the true coefficient;
- fp16 overflow: a chunk whose own gradient is not finite is not updated, and no later chunk is; if any
  rank overflowed, `step` undoes the updates and skips the step, as without overlap;
- that this backward is the last before `step`: speculated when the step has seen one backward fewer
  than the plan's `grad_accum` (later: than the previous step's count). Another backward before `step`
  undoes the updates and accumulates as usual; so does `zero_grad` without a `step`.
Whenever the speculation holds the result is bit for bit the step after backward: the same operators on
the same values, chunk by chunk (unscale, finite check, norm, update), and the write-back of the
updated masters into the parameters waits for `step` on the main thread, as it does without overlap.
After a rollback the result equals it to a few units in the last place of fp32 (undo.py).

What an undo needs is the gradient the update used. A chunk whose gradient stays anyway (optimizer on
the device, or gradients held between micro-batches) keeps it as its master's `.grad`. A host chunk's
gradient only passes through a bounded pool of staging buffers (pinned on CUDA) that the update
consumes; what stays is its *rollback log*: the gradient as reduced, before unscaling, in the compute
dtype (2 bytes per element in bf16 and fp16). On one rank with one micro-batch that is the gradient
exactly (it was computed in that dtype); across ranks the reduced mean is rounded to it, which an undo
then carries (see BENCHMARKS.md). On a GPU the copy of a host chunk's gradient down to the host writes its
log as well (cast on the device, 2 more bytes per element on the copy engine) and the device checks the
gradient for an inf or a NaN before it leaves (`copied_down`), so the worker's cores, the bottleneck of a
host-optimizer plan, only run the optimizer: on the H200 of BENCHMARKS.md the cast into the log and the sum
took 40% of each update there, where the copy engine had time to spare. In a run that clips, the device
also takes the chunk's norm on the way, which the host's cores would otherwise read the gradient once more
for; that norm is summed in the device's order, so the norm `clip_grad_norm_` returns can differ in its last
bits from the one the host takes without updates inside backward (where the clip acts, the redo above reads
it). In all a host chunk holds its fp32 master, two fp32 AdamW states and the log: 14 bytes per parameter in
bf16 (16 in fp32), against 16 without overlap (master, states and an fp32 gradient held until after
backward). 12 is not reachable while a global-norm clip may act: either the gradient or the pre-update state
must survive until the norm is known, and undoing without either has nothing to recompute from.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from elixir.memory import Chunk
from elixir.optim.undo import undo_update, undoable

UPDATE_PARTS = ("update_log_s", "update_check_s", "update_step_s", "update_shard_s", "accumulate_s")
"""What the worker's time goes to, timed apart by `step_stats`: the parts of an update, and the gradients of a
step's later micro-batches added into host chunks' gradients (see [Note: accumulating on the worker])."""

LOG_CAST_NUMEL = 2**23
"""Elements of the device buffer a host chunk's fp32 gradient is cast into on a GPU, a tile at a time, on its
way down into its rollback log (`Speculation.copied_down`): 16 MiB in bf16 whatever the chunk's size, where a
cast of the whole shard would take a temporary as large as its log. The cost model reads this constant too."""


def log_cast_numel(chunks, logs: dict[int, torch.Tensor]) -> int:
    """Elements of that buffer on a GPU (0: none): host chunks whose log is not fp32, as the reduced gradient
    is."""
    sizes = [logs[c.index].numel() for c in chunks
             if c.optim_home == "host" and c.index in logs and logs[c.index].dtype != torch.float32]
    return min(LOG_CAST_NUMEL, max(sizes)) if sizes else 0


# [Note: accumulating on the worker]
# With several micro-batches per step a host chunk's gradient is held on the host between them, and each later
# micro-batch's gradient is added into it. On a GPU that gradient crosses through a staging buffer; the add had
# run on the main thread right away, after a synchronize of the whole device, inside backward's hook: the GPU
# sat idle while the host's cores added (12 bytes per element), once per chunk and micro-batch, and in the last
# micro-batch those adds ran beside the worker's updates on the same cores. On the H200 of BENCHMARKS.md the
# offload stage's step (OPT-2.7B, 4 micro-batches, 20 host chunks of 134M elements) took 5.07 s against 3.43
# predicted, and the worker's finite checks and norms ran at 16 GB/s where the host streams ~80 GB/s alone.
# Where the optimizer has a worker (updates inside backward on), the copy down now runs on the side stream and
# the add on the worker (`accumulate`), which gives the buffer back: the main thread keeps launching backward,
# and the adds and the last micro-batch's updates take turns on the worker in the order they were submitted,
# so a chunk's update always follows its own add. A backward without updates inside it waits for its adds
# before it returns (`wait_accumulations`), so that the gradients are whole when it does, as before; one with
# updates leaves that to `step`, whose wait for the updates waits for the adds before them.
STAGING_BUFFERS = 2
"""Host buffers a host chunk's gradient passes through on its way to the update: the D2H copy of one
can fill while the worker updates from the other. The cost model reads this constant too."""


@dataclass(eq=False)
class Speculated:
    """One chunk's update during the backward now being checked."""

    chunk: Chunk
    grad: torch.Tensor
    """What the update reads: a staging buffer, or the master's `.grad`."""
    log: torch.Tensor | None
    """Where the gradient stays for an undo when `grad` is a staging buffer (see the Note)."""
    staging: torch.Tensor | None
    inv_scale: float
    future: Future | None = None
    ready: object = None  # a CUDA event: the gradient's copy into staging is done
    log_copied: bool = False  # that copy also wrote the log (`Speculation.copied_down`)
    checked: torch.Tensor | None = None  # the device's finite check, landed with `ready` (pinned, one bool)
    normed: torch.Tensor | None = None  # the device's norm of it for a clip, landed with `ready` (pinned, one fp32)
    normed_type: float = 2.0
    finite: bool | torch.Tensor = True
    norm: torch.Tensor | None = None
    norm_type: float = 2.0
    updated: bool = False
    fresh: bool = False  # the update made the optimizer state (it had none)
    coef: float | None = None  # the clip coefficient the update's gradient was multiplied by (None: 1)
    region: Future | None = None  # a disk chunk: the read of its region (see elixir/optim/ondisk.py)
    shard_written: bool = False  # its update also wrote its parameter shard (`step` need not)


class Speculation:
    """Runs, checks and undoes the updates of one ElixirOptimizer during backward."""

    def __init__(self, optimizer, *, grad_accum: int, logs: dict[int, torch.Tensor]):
        self.opt = optimizer
        self.device = optimizer.runtime.device
        self.expected_backwards = grad_accum
        self.backwards = 0  # backward passes since the last step
        self.active = False  # this backward's chunks are updated as they complete
        self.records: dict[int, Speculated] = {}  # chunk index -> record, this step
        self.logs = logs  # host chunk index -> rollback log (compute dtype)
        self.grads = optimizer.runtime.grads  # owns the staging buffers
        # [Note: one thread for the worker on a CPU device]
        # On a CPU-only machine the worker shares the cores with the compute threads. A worker operator that runs
        # in parallel (a copy of a shard of a few MiB) gives the worker an OpenMP team of its own; with GNU
        # OpenMP, more teamed threads than cores puts every team in its throttled mode, where a team's threads
        # sleep between parallel regions, and each of the compute thread's ~1,500 parallel regions per step
        # then wakes its team through the kernel. Measured on the 2-core CPU of BENCHMARKS.md (Llama, 14
        # chunks, two with homes on the device and states on the host): ~1,400-1,650 voluntary context switches
        # per step against ~5 with a worker of one thread, and 4-6% of the step (0.219 against 0.206 s, 0.187
        # against 0.179 s, in two pairs of runs). The worker's operators therefore run on one thread.
        # On a GPU the compute thread launches kernels and the worker may use the host's cores (host AdamW).
        cpu_device = self.device.type != "cuda"
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elixir-optimizer",
                                          initializer=torch.set_num_threads if cpu_device else None,
                                          initargs=(1,) if cpu_device else ())
        self._accumulating: list[Future] = []  # adds on the worker not yet waited for ([Note: accumulating ...])
        self._stop_updates = False  # a chunk overflowed: later ones are not updated (worker-side)
        self._retracted: set[int] = set()  # chunks of this backward that got a gradient after their update
        self._counted = False  # this backward counted in speculated_steps
        # learned from the last clip_grad_norm_ call; None after a step without one: no norms computed
        self.norm_type: float | None = 2.0
        self.clip_coef = 1.0  # the coefficient the last step's clip applied (1: it did not act, or no clip)
        self.clipped = False  # clip_grad_norm_ ran in this step
        self.cuda = self.device.type == "cuda"
        self.update_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.d2h_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.worker_stream = torch.cuda.Stream(self.device) if self.cuda else None  # the worker's CUDA copies
        # one flag per chunk for the device's finite check of a host chunk's gradient, and the device buffer
        # its log is cast through (`copied_down`)
        slots = 1 + max((c.index for c in optimizer.chunks), default=0)
        self._finite = torch.ones(slots, dtype=torch.bool, pin_memory=self.cuda)
        self._norms = torch.zeros(slots, dtype=torch.float32, pin_memory=self.cuda)  # and of its norm for a clip
        cast_numel = log_cast_numel(optimizer.chunks, logs) if self.cuda else 0
        self.log_cast = (optimizer.runtime.tracker.empty(
            cast_numel, next(log.dtype for log in logs.values() if log.dtype != torch.float32), "device")
            if cast_numel else None)
        # disk chunks in the order their gradients completed in the last step: what to read ahead
        self._disk_order: list[Chunk] = sorted((c for c in optimizer.chunks if c.optim_home == "disk"),
                                               key=lambda c: -c.index)
        self._disk_seen: list[Chunk] = []
        # statistics (elixir.step_stats)
        self.speculated_steps = 0
        self.rollbacks = 0
        self.rollback_reasons: dict[str, int] = {}
        self.late_gradients = 0
        self.clip_pauses = 0
        # seconds, cumulative: the updates inside backward on the worker and on the main thread (each thread
        # adds to its own), and the worker's waits for a gradient's copy into staging (CUDA)
        self.worker_update_s = 0.0
        self.main_update_s = 0.0
        self.update_wait_s = 0.0
        # the worker's updates by part (host clock): the gradient into its rollback log, the finite check (and
        # the chunk's norm for a clip), the optimizer's own step, the write of the master into the parameter shard
        self.worker_parts_s = dict.fromkeys(UPDATE_PARTS, 0.0)

    @staticmethod
    def supported(optimizer_class: type, groups: list[dict]) -> bool:
        return all(undoable(optimizer_class, g) for g in groups)

    # --- backward -----------------------------------------------------------------------------

    def begin_backward(self) -> None:
        """A backward starts: updates of a speculated earlier one in this step go back (more backward
        passes than expected: accumulate instead), then decide whether this one speculates."""
        if self.records:
            self.rollback("accumulation", hold=True)
        self.backwards += 1
        self.active = self.backwards == self.expected_backwards and self.clip_coef == 1.0
        if self.backwards == self.expected_backwards and not self.active:
            self.clip_pauses += 1  # the last step's clip acted: this one updates after backward (see the Note)
        self._stop_updates = False
        self._retracted.clear()
        self._counted = False
        if self.active:
            self._disk_seen = []
            if self.opt.disk is not None:
                self.opt.disk.read_ahead(self._disk_order)

    def speculates_on(self, chunk: Chunk) -> bool:
        """Whether `chunk` is updated now. Not a chunk whose master *is* its parameter shard (fp32 compute,
        shard and optimizer in one tier): its parameters would change before `step`, under any later use."""
        return (self.active and chunk.master is not None and chunk.master is not chunk.shard
                and chunk.index not in self._retracted)

    def before_fetch(self, chunk: Chunk) -> None:
        """`chunk` is about to be read into the cache. A shard derived from its master (see wrap.py), or
        written right after its update, would hold an update `step` has not confirmed: undo it first."""
        rec = self.records.get(chunk.index)
        if rec is not None and (chunk.shard is None or rec.shard_written):
            self.late(chunk)  # a derived shard, or one its update already wrote

    def before_forward(self) -> None:
        """A forward starts while this step's updates are unconfirmed: a further micro-batch (or any use of
        the model before `step`) sees the parameters as they were."""
        if self.records:
            self.rollback("accumulation", hold=True)

    def late(self, chunk: Chunk) -> bool:
        """A gradient for a chunk already updated in this backward (it reached its reduction before all of
        its gradients, as reentrant checkpointing can in the first step), or a fetch of it: undo its update
        and hold its gradient, which `step` applies after backward."""
        rec = self.records.get(chunk.index)
        if rec is None:
            return False
        self._drain()
        with self._region(rec):
            self._undo(rec)
            self._hold(rec)
        del self.records[chunk.index]
        self._retracted.add(chunk.index)
        self.late_gradients += 1
        return True

    def raise_failures(self) -> None:
        """Raise the error of an update or an add that failed on the worker, if any."""
        for future in [rec.future for rec in self.records.values()] + self._accumulating:
            if future is not None and future.done() and future.exception() is not None:
                future.result()

    def accumulates_on_worker(self, chunk: Chunk) -> bool:
        """Whether a later micro-batch's gradient of `chunk` is added into its held host gradient on the worker
        (see [Note: accumulating on the worker]): a host chunk on a GPU, whose gradient crosses through staging (a
        disk chunk's is added on the main thread, as without a worker)."""
        return self.cuda and chunk.optim_home == "host" and self.grads.staging_buffers > 0

    def accumulate(self, chunk: Chunk, staging: torch.Tensor, ready) -> None:
        """Add `chunk`'s gradient shard, copied into `staging` (landed at the CUDA event `ready`; None: there
        already), into its master's gradient on the worker, which then gives the buffer back."""
        self._accumulating.append(self._worker.submit(self._add_staged, chunk, staging, ready))

    def _add_staged(self, chunk: Chunk, staging: torch.Tensor, ready) -> None:
        try:
            if ready is not None:
                started = time.perf_counter()
                ready.synchronize()
                self.update_wait_s += time.perf_counter() - started
            started = time.perf_counter()
            chunk.master.grad.add_(staging[: chunk.shard_numel])
            self.worker_parts_s["accumulate_s"] += time.perf_counter() - started
        finally:
            self.grads.give_staging(staging)

    def wait_accumulations(self) -> None:
        """Wait for the adds submitted so far; raise the first that failed."""
        pending, self._accumulating = self._accumulating, []
        for future in pending:
            future.result()

    def logs_directly(self, chunk: Chunk) -> bool:
        """Whether `chunk`'s gradient can go straight into its rollback log and be updated from there: an fp32
        log on the CPU (no copy to cross, nothing to pin) that the update does not scale in place (no loss
        scale), which saves a copy of the gradient per step."""
        log = self.logs.get(chunk.index)
        return (log is not None and log.dtype == torch.float32 and not self.cuda and chunk.optim_home == "host"
                and not self.opt.scaler.enabled)

    def copied_down(self, chunk: Chunk) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """What the copy of `chunk`'s gradient down to its staging buffer writes besides (see the Note): on a GPU,
        a host chunk's rollback log (pinned; cast through `log_cast`), the flag of the device's finite check and,
        in a run that clips, the device's norm of it (`norm_type`), unless a loss scale makes the worker check and
        measure after unscaling; (None, None, None) elsewhere (a disk chunk's log is in its region)."""
        return self._copy_targets(chunk) if self.cuda else (None, None, None)

    def _copy_targets(self, chunk: Chunk) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if chunk.optim_home != "host" or chunk.index not in self.logs:
            return None, None, None
        if self.opt.scaler.enabled:
            return self.logs[chunk.index], None, None
        i = chunk.index
        return self.logs[i], self._finite[i : i + 1], None if self.norm_type is None else self._norms[i : i + 1]

    def submit(self, chunk: Chunk, grad: torch.Tensor, *, staging: torch.Tensor | None = None, ready=None,
               logged: bool = False, log_copied: bool = False, checked: torch.Tensor | None = None,
               normed: torch.Tensor | None = None) -> None:
        """Update `chunk` from `grad` (its final gradient for this step, before unscaling); `logged`: `grad`
        is the chunk's log itself (see `logs_directly`); `log_copied`, `checked`, `normed`: the copy into
        `staging` also wrote the log, the device's finite check into `checked` and its norm into `normed`
        (`copied_down`)."""
        opt = self.opt
        stepper = opt.stepper_of(chunk)
        stepper.param_groups[0].update(opt.hyper_of(chunk))  # the values step() would use now
        rec = Speculated(chunk, grad, self.logs.get(chunk.index) if staging is not None or logged else None, staging,
                         1.0 / opt.scaler.scale if opt.scaler.enabled else 1.0, ready=ready, log_copied=log_copied,
                         checked=checked, normed=normed, normed_type=self.norm_type or 2.0)
        self.records[chunk.index] = rec
        if not self._counted:  # a step with at least one update inside backward
            self.speculated_steps += 1
            self._counted = True
        if chunk.optim_home == "disk":
            rec.region = opt.disk.claim(chunk)
            self._disk_seen.append(chunk)
            done = {c.index for c in self._disk_seen}
            opt.disk.read_ahead([c for c in self._disk_order if c.index not in done])
        if self.cuda and chunk.optim_home == "device":
            # on the side stream, after the compute stream's work that made the gradient
            self.update_stream.wait_stream(torch.cuda.current_stream(self.device))
            started = time.perf_counter()
            with torch.cuda.stream(self.update_stream):
                self._update(rec, stepper)
            self.main_update_s += time.perf_counter() - started  # launching it: its kernels run on the stream
        else:
            rec.future = self._worker.submit(self._timed_update, rec, stepper)

    def _timed_update(self, rec: Speculated, stepper) -> None:
        """`_update` on the worker, its time counted (`step_stats`: update_s)."""
        started = time.perf_counter()
        try:
            self._update(rec, stepper, self.worker_parts_s)
        finally:
            self.worker_update_s += time.perf_counter() - started

    def _update(self, rec: Speculated, stepper, parts: dict | None = None) -> None:
        """The update of one chunk, in the order the step after backward runs it (see the Note), then the
        cast of its master into its parameter shard: the chunk is not used again in this backward, and on
        the worker the write-back hides behind backward too (an undo writes the shard again; a fetch
        before `step` undoes the update first: `before_fetch`). A disk chunk's region is in memory around
        it all. `parts`: where to add the time of each part (the worker's `worker_parts_s`)."""
        clock = _Clock(parts)
        if rec.region is None:
            self._update_in_memory(rec, stepper, clock)
            self._write_shard(rec)
            clock.lap("update_shard_s")
            return
        disk = self.opt.disk
        buf = rec.region.result()
        disk.attach(rec.chunk, buf, rec.log)
        after = None
        try:
            clock.restart()  # the disk read is not the update's
            self._update_in_memory(rec, stepper, clock)
            after = self._write_shard(rec)
            clock.lap("update_shard_s")
        finally:
            disk.release(rec.chunk, buf, rec.log, after=after)

    def _write_shard(self, rec: Speculated):
        """Write the updated master into the shard now where that needs no staging shared with the main
        thread: on the worker (host and disk chunks), or a device master cast on the device. Returns the CUDA
        event of the copy, if any."""
        chunk = rec.chunk
        if not rec.updated or chunk.shard is None or chunk.shard is chunk.master:
            return None
        if chunk.resident and chunk.expected_grads is None:
            # a resident chunk's parameters are read without a fetch, so nothing would catch a use after its
            # gradient seemed complete (a recomputation in the first backward, before the gradient counts
            # are learned): its shard waits for step
            return None
        if chunk.optim_home == "device" and chunk.param_home != "device" and self.cuda:
            return None  # a device master into a host shard: at step, with the main thread's staging
        rec.shard_written = True
        if self.cuda and chunk.optim_home != "device":
            return self.opt.write_shard(chunk, stream=self.worker_stream, staging="worker")
        self.opt.write_shard(chunk)
        return None

    def _update_in_memory(self, rec: Speculated, stepper, clock: _Clock) -> None:
        if rec.ready is not None:
            started = time.perf_counter()
            rec.ready.synchronize()  # the gradient's copy into pinned staging has landed
            self.update_wait_s += time.perf_counter() - started
            clock.restart()
        g = rec.grad
        if rec.log is not None and rec.log is not g and not rec.log_copied:
            rec.log.copy_(g)
            clock.lap("update_log_s")
        if self.opt.scaler.enabled:
            g.mul_(rec.inv_scale)
            finite = torch.isfinite(g).all()
        elif rec.checked is not None:  # checked on the device before the copy
            finite = rec.checked[0]
        else:  # a NaN or inf anywhere makes the sum one: a read of the gradient, no bool copy of it
            finite = torch.isfinite(g.sum())
        if not self.cuda or rec.chunk.optim_home != "device":
            rec.finite = bool(finite)
            if not rec.finite:  # no update from it (it could not be undone), nor from later chunks
                self._stop_updates = True
        else:
            rec.finite = finite
            stepper.found_inf = (~finite).float()  # the fused kernel skips the update on the device
        if self._stop_updates:
            self._release(rec)
            return
        if self.norm_type is not None:  # a run that clips: the clip after backward reads these
            measured = rec.normed is not None and rec.normed_type == self.norm_type  # on the device, on the way
            rec.norm = rec.normed[0].clone() if measured else chunk_norm(g, self.norm_type)
            rec.norm_type = self.norm_type
        clock.lap("update_check_s")
        master = rec.chunk.master
        rec.fresh = not self.opt.state.get(master)
        master.grad = g
        stepper.step()
        clock.lap("update_step_s")
        stepper.found_inf = None
        if rec.log is not None:  # the gradient lives in the log (or a staging buffer), not as the master's
            master.grad = None
        rec.updated = True
        self._release(rec)

    def _release(self, rec: Speculated) -> None:
        if rec.staging is not None:
            self.grads.give_staging(rec.staging)
            rec.staging = None
            rec.grad = None

    def end_backward(self) -> None:
        self.active = False

    # --- after backward -------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Updates of this step ran during backward and are not yet confirmed by `step`."""
        return bool(self.records)

    def _drain(self) -> None:
        """Wait for every update and add of this step; raise the first one that failed."""
        for rec in self.records.values():
            if rec.future is not None:
                rec.future.result()
        self.wait_accumulations()
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.update_stream)
            current.wait_stream(self.worker_stream)

    def wait(self) -> list[Speculated]:
        self._drain()
        return [self.records[c.index] for c in self.opt.chunks if c.index in self.records]

    def gradient_of(self, rec: Speculated, coef: float | None = None, *, loaded: bool = False) -> torch.Tensor:
        """The unscaled fp32 gradient times `coef` (default: the coefficient the chunk's last update used).
        A chunk whose master keeps its `.grad` has it there, scaled in place (as the clip after backward
        does): that tensor is returned, scaled to `coef` first; otherwise it is rebuilt from the log (read
        from disk for a disk chunk, unless its region is `loaded` already)."""
        coef = rec.coef if coef is None else coef
        if rec.log is None:
            g = rec.chunk.master.grad
            if coef != rec.coef:
                g.mul_((coef or 1.0) / (rec.coef or 1.0))
                rec.coef = coef
            return g
        if rec.chunk.optim_home == "disk" and not loaded:
            with self.opt.disk.loaded(rec.chunk, log=rec.log):
                return self.gradient_of(rec, coef, loaded=True)
        g = rec.log.to(device=rec.chunk.master.device, dtype=torch.float32, copy=True)
        if rec.inv_scale != 1.0:
            g.mul_(rec.inv_scale)
        if coef is not None:
            g.mul_(coef)
        return g

    def holds(self, coef: float) -> bool:
        """Whether the clip coefficient the updates speculated is `coef`."""
        return all((r.coef or 1.0) == coef for r in self.records.values() if r.updated)

    def redo_clipped(self, coef: float) -> None:
        """The clip coefficient is not what the updates speculated: undo every update and run it again
        with the gradient times `coef` (as the clip after backward scales it)."""
        self.rollbacks += 1
        self.rollback_reasons["clip"] = self.rollback_reasons.get("clip", 0) + 1
        for rec in self.wait():
            if not rec.updated:
                continue
            with self._region(rec):
                self._undo(rec, self.gradient_of(rec, loaded=True))
                g = self.gradient_of(rec, None if coef == 1.0 else coef, loaded=True)
                master = rec.chunk.master
                master.grad = g
                rec.coef = None if coef == 1.0 else coef
                rec.fresh = not self.opt.state.get(master)
                self.opt.stepper_of(rec.chunk).step()
                rec.updated = True
                if rec.log is not None:
                    master.grad = None
                if rec.shard_written:
                    self.opt.write_shard(rec.chunk)

    def rollback(self, reason: str, *, hold: bool = False) -> None:
        """Undo every update of this step. `hold`: keep the gradients as the masters' `.grad` (scaled, as
        backward leaves them) so that the next backward accumulates into them."""
        recs = self.wait()
        if any(r.updated for r in recs):
            self.rollbacks += 1
            self.rollback_reasons[reason] = self.rollback_reasons.get(reason, 0) + 1
        for rec in recs:
            with self._region(rec):
                if rec.updated:
                    self._undo(rec)
                if hold:
                    self._hold(rec)
        self.records.clear()
        self._learn_disk_order()

    def _undo(self, rec: Speculated, g: torch.Tensor | None = None) -> None:
        if torch.is_tensor(rec.finite) and not bool(rec.finite):
            rec.updated = False  # the fused kernel skipped it on the device (found_inf)
        if not rec.updated:
            return
        master = rec.chunk.master
        g = self.gradient_of(rec) if g is None else g
        stepper = self.opt.stepper_of(rec.chunk)
        undo_update(self.opt.inner_class, master, self.opt.state[master], g, stepper.param_groups[0],
                    fresh=rec.fresh)
        if rec.fresh:
            self.opt.state.pop(master, None)
        rec.updated = False
        if rec.shard_written:  # its update had written the parameter shard already
            self.opt.write_shard(rec.chunk)

    def _hold(self, rec: Speculated) -> None:
        """Put the chunk's gradient back as its master's `.grad`, scaled as backward leaves it."""
        master = rec.chunk.master
        if rec.log is not None:
            g = self.opt.runtime.grads.hold_host_grad(rec.chunk)
            g.copy_(rec.log)
            master.grad = g
        elif master.grad is not None:
            if rec.coef is not None:
                master.grad.div_(rec.coef)
            if rec.inv_scale != 1.0:
                master.grad.mul_(1.0 / rec.inv_scale)  # exact: the scale is a power of two

    def confirm(self) -> None:
        """`step` accepted this step's updates."""
        self.records.clear()
        self._learn_disk_order()

    def _learn_disk_order(self) -> None:
        if self._disk_seen:
            seen = {c.index for c in self._disk_seen}
            self._disk_order = self._disk_seen + [c for c in self._disk_order if c.index not in seen]
            self._disk_seen = []
        if self.opt.disk is not None:
            self.opt.disk.drop_reads()

    def _region(self, rec: Speculated):
        """A disk chunk's master, states and log in memory (and written back) around a rollback."""
        if rec.chunk.optim_home != "disk":
            return nullcontext()
        return self.opt.disk.loaded(rec.chunk, write_back=True, log=rec.log)

    def end_step(self) -> None:
        """`step` ran: learn how many backward passes a step has, and the clip coefficient."""
        if self.backwards:
            self.expected_backwards = self.backwards
        self.backwards = 0
        if not self.clipped:
            self.clip_coef = 1.0
            self.norm_type = None  # a run without a clip: its updates compute no norms
        self.clipped = False

    def forget_backwards(self) -> None:
        self.backwards = 0

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def stats(self) -> dict:
        return {
            "speculated_steps": self.speculated_steps,
            "rollbacks": self.rollbacks,
            "rollback_reasons": dict(self.rollback_reasons),
            "late_gradients": self.late_gradients,
            "clip_pauses": self.clip_pauses,
            "update_s": self.worker_update_s + self.main_update_s,
            "update_wait_s": self.update_wait_s,
            **self.worker_parts_s,
        }


class _Clock:
    """Adds the time since its last lap to a part's total in `parts` (nothing when `parts` is None)."""

    def __init__(self, parts: dict | None):
        self.parts = parts
        self.t = time.perf_counter()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def lap(self, part: str) -> None:
        if self.parts is not None:
            now = time.perf_counter()
            self.parts[part] += now - self.t
            self.t = now


def chunk_norm(g: torch.Tensor, norm_type: float) -> torch.Tensor:
    """One chunk's contribution to the gradient norm, as the clip after backward computes it."""
    if norm_type == math.inf:
        return g.abs().max()
    return torch.linalg.vector_norm(g, norm_type)
