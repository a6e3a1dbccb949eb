"""Running a comparison: the process group, building every system, and timing them in alternation.

`build_all` builds each system in turn and runs its warm-up steps, recording the memory it keeps;
`compare` runs repetitions in which every system runs its steps in turn (the order rotating), with a
barrier and the slowest rank's time, and per system the most memory a repetition adds, by the
`MemoryMeter`s of elixir/bench/meters.py (docs/architecture.md, "How we measure").
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from elixir import comm
from elixir.bench.meters import MemoryMeter
from elixir.bench.systems import TORCH_LINEAR, System


def single_process_group(device: torch.device, timeout_s: float = 600.0) -> Callable[[], None]:
    """Join a process group of one rank (FSDP2 and DeepSpeed need one even alone), with the environment
    DeepSpeed reads; returns the function that leaves it and restores the environment."""
    import socket

    if dist.is_initialized():
        return lambda: None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=timeout_s))

    def leave() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return leave


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def max_over_ranks(values: Sequence[float]) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_ok(ok: bool) -> bool:
    """True when `ok` on every rank: all ranks must agree whether a system runs, or collectives hang."""
    return max_over_ranks([0.0 if ok else 1.0])[0] == 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Progress:
    """One progress line on rank 0: redrawn in place on a terminal, a line per update otherwise."""

    def __init__(self, out=None, enabled: bool = True) -> None:
        self.out = out or sys.stdout
        self.enabled = enabled and comm.rank_and_world()[0] == 0
        self.tty = self.enabled and self.out.isatty()
        self.started = time.perf_counter()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        m, s = divmod(int(time.perf_counter() - self.started), 60)
        text = f"[{m}:{s:02d}] {text}"
        if self.tty:
            self.out.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
            self._width = 0


def build_all(builders: dict[str, Callable[[], System]], x: torch.Tensor, *, warmup: int, device: torch.device,
              meters: dict[str, MemoryMeter], log: Callable[[str], None] = print,
              progress: Progress | None = None) -> tuple[list[System], dict[str, str]]:
    """Build each system in turn and run its warm-up steps, recording the memory it keeps. A system that
    fails to build or warm up (on any rank) is left out with its reason; the run goes on."""
    systems: list[System] = []
    skipped: dict[str, str] = {}
    for name, build in builders.items():
        if progress:
            progress.update(f"building {name} + {warmup} warm-up step(s)")
        gc.collect()
        sync(device)
        before = {k: m.now() for k, m in meters.items()}
        started = time.perf_counter()
        err = None
        try:
            s = build()
            for _ in range(warmup):
                s.step(x)
            sync(device)
        except Exception as e:  # noqa: BLE001 - a system that cannot run here is reported, not fatal
            torch.nn.functional.linear = TORCH_LINEAR
            text = str(e).strip()
            err = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
            s = None
        if not all_ok(err is None):
            skipped[name] = err or "failed on another rank"
            log(f"[{name}] CANNOT RUN: {skipped[name]}")
            del s
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        gc.collect()
        s.retained = {k: max(0, m.now() - before[k]) for k, m in meters.items()}
        systems.append(s)
        log(f"[{name}] built + {warmup} warm-up step(s) in {time.perf_counter() - started:.1f} s; {s.note}")
    return systems, skipped


def compare(systems: list[System], x: torch.Tensor, *, reps: int, steps: int, tokens_per_step: int,
            device: torch.device, meters: dict[str, MemoryMeter], progress: Progress | None = None,
            deadline: float | None = None, log: Callable[[str], None] = print) -> int:
    """Alternate the systems: every repetition times `steps` steps of each in turn (the order rotates),
    between barriers, keeping the slowest rank's time, and the most memory the steps added per meter.
    Stops starting repetitions after `deadline` (time.perf_counter()); returns the repetitions run."""
    order = list(systems)
    done = 0
    for rep in range(reps):
        if deadline is not None and rep > 0 and not all_ok(time.perf_counter() <= deadline):
            log(f"time box reached: {rep} of {reps} repetitions run")
            break
        for s in order:
            if progress:
                progress.update(f"rep {rep + 1}/{reps}: {s.name} ({steps} step(s))")
            gc.collect()
            sync(device)
            base = {k: m.now() for k, m in meters.items()}
            for m in meters.values():
                m.reset_peak()
            barrier()
            start = time.perf_counter()
            for _ in range(steps):
                s.step(x)
            sync(device)
            elapsed = time.perf_counter() - start
            barrier()
            added = [max(0, m.peak() - base[k]) for k, m in meters.items()]
            elapsed, *added = max_over_ranks([elapsed, *added])
            for k, v in zip(meters, added):
                s.transient[k] = max(s.transient.get(k, 0), int(v))
            s.seconds.append(elapsed)
            s.tokens_per_s.append(steps * tokens_per_step / elapsed)
        done += 1
        order = order[1:] + order[:1]
    if progress:
        progress.done()
    return done
