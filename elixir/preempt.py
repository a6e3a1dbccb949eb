"""Stopping cleanly when the machine is taken away: preemption signals turn into a stop at a step boundary
that every rank agrees on.

[Note: preemption]
Spot and preemptible machines, and schedulers (SLURM, Kubernetes, torchrun passing on its own signal),
announce the end with SIGTERM (SLURM's `--signal` often with SIGUSR1), a person with ^C (SIGINT), and follow
with SIGKILL after a grace period (torchrun: 30 s). A handler that saved at once would save in the middle
of a step (gradients half reduced, updates inside backward unconfirmed) and, on several ranks, each at
its own step. So the handler only records the signal; the training loop asks `requested()` once per step,
after `step`, on every rank: one all-reduced flag, so that all ranks stop after the same step even when the
signal reached only one of them. The loop then saves and exits with `EXIT_PREEMPTED`. A second signal
means "now": the process exits at once with 128 + the signal's number, as if the signal had killed it
(what was saved before stays; atomic saves never leave a half-written checkpoint in place).

The flag's all-reduce runs on the CPU (gloo; a gloo group of its own beside NCCL), so asking costs no
device synchronization: tens of microseconds per step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from elixir import comm
from elixir.memory.chunk import ChunkGroup

EXIT_PREEMPTED = 75
"""Exit status of a run that stopped on a signal after saving: resumable (sysexits' EX_TEMPFAIL, "try again
later", which job schedulers and retry wrappers take as a temporary failure)."""

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

SAME_EVENT_S = 2.0
"""A signal this soon after the first is the same event, not a second request: ^C under torchrun reaches a
worker as SIGINT from the terminal and as SIGTERM from torchrun; SLURM signals every process of a job step,
torchrun among them, which passes it on."""


class Preemption:
    """Catch preemption signals while training; every rank enters it (it may make a process group).

        with elixir.Preemption() as stop:
            for step in range(start, steps):
                ...  # forward, backward, step
                if stop.requested():  # every rank, every step: True on all of them at the same step
                    elixir.save(model, opt, path)
                    sys.exit(elixir.EXIT_PREEMPTED)

    The handlers are those of the main thread, installed on entry and the previous ones restored on exit.
    A second signal exits the process at once (see [Note: preemption])."""

    def __init__(self, signals=SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None  # the first signal received, on this rank
        self.stopped_by: int | None = None  # a signal some rank received, once `requested` said so
        self._previous: dict[int, object] = {}
        self._group = None
        self._flag = None
        self._first_at = 0.0

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("elixir.Preemption catches signals, which Python delivers to the main thread only: "
                             "enter it in the main thread")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # the flag goes over the CPU: a gloo group beside NCCL, the world itself under gloo
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._flag = torch.zeros(1)
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def received(self) -> bool:
        """Whether this rank received a signal (the others may not know yet: ask `requested`)."""
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and time.monotonic() - self._first_at < SAME_EVENT_S:
            return  # one event reaching this process twice (see SAME_EVENT_S)
        if self.signum is not None:
            print(f"elixir: {signal.Signals(signum).name} again: exiting now, without saving", file=sys.stderr,
                  flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()
        print(f"elixir: {signal.Signals(signum).name} received: stopping after this step (send it again to exit now)",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether to stop now: True on every rank at the same call once any rank received a signal. Every rank
        calls it at the same point of each step (it is a collective on several ranks)."""
        if self._flag is None:
            stop = self.signum is not None
            if stop:
                self.stopped_by = self.signum
            return stop
        self._flag[0] = self.signum if self.signum is not None else 0
        rank, world = comm.rank_and_world()
        comm.all_reduce_max(self._flag, ChunkGroup(self._group, rank, world), "all-reduce of the preemption flag")
        signum = int(self._flag[0])
        if signum:
            self.stopped_by = signum
        return bool(signum)

    @property
    def signal_name(self) -> str | None:
        return None if self.stopped_by is None else signal.Signals(self.stopped_by).name
