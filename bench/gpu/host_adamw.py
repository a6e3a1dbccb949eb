"""The host's fused AdamW on one chunk under what a training step adds around it, one thing at a time.

Inside a step of a host-optimizer plan the optimizer's worker ran AdamW over 32M-element chunks more slowly than
`Hardware.measure()` of format 12 timed it alone (BENCHMARKS.md, "On one GPU"); format 13 times it beside a
thread launching kernels, the condition this stage found to match. This times a step over 2**25 elements (the
parameter, gradient and two moments: 512 MB, beyond the host's caches) as it is alone, then with what the step
adds: the parameter and gradient in pinned memory (the runtime's masters and staging buffers are), a thread that
launches kernels without pause (the compute thread), copies streaming both ways between pinned buffers and the
device (fetches, gradients going down, masters going up), and all of them at once; each with the worker's
default threads and with one fewer. Prints G elements per second per condition (median of the steps).

    python bench/gpu/host_adamw.py --out DIR [--budget-s S] [--dry-run]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import gpubench as G
import torch

from elixir.hardware.measure import _beside_launching  # what calibration times the host's rates beside

NUMEL = 2**25
STEPS = 12


def adamw_step(numel: int, pinned: bool):
    param = torch.zeros(numel, pin_memory=pinned, requires_grad=True)
    grad = torch.randn(numel)
    param.grad = grad.pin_memory() if pinned else grad
    optim = torch.optim.AdamW([param], lr=1e-3, fused=True)
    optim.step()  # the moments are made here
    return optim.step


class Background:
    """A thread doing `work` over and over until stopped."""

    def __init__(self, work):
        self.work, self.stop = work, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.work()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def copier(device, nbytes: int):
    """Copies both ways between pinned host buffers and the device, on side streams, without pause."""
    n = nbytes // 4
    up_src, down_dst = torch.ones(n, pin_memory=True), torch.empty(n, pin_memory=True)
    up_dst, down_src = torch.empty(n, device=device), torch.ones(n, device=device)
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def work():
        with torch.cuda.stream(up):
            up_dst.copy_(up_src, non_blocking=True)
        with torch.cuda.stream(down):
            down_dst.copy_(down_src, non_blocking=True)
        up.synchronize()
        down.synchronize()

    return work


def timed(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    args = G.parser(__doc__.splitlines()[0], budget_s=60).parse_args()
    device = G.device_for(args)
    numel, steps = (2**18, 3) if args.dry_run else (NUMEL, STEPS)
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    conditions = [("alone", False, False, False), ("pinned", True, False, False),
                  ("launching thread", False, True, False)]
    if cuda:
        conditions += [("copies both ways", False, False, True), ("pinned + launching + copies", True, True, True)]
    result = {"machine": G.machine(device), "numel": numel, "threads": threads, "rows": []}
    stop = G.deadline(args)
    for n_threads in dict.fromkeys((threads, max(1, threads - 1))):
        torch.set_num_threads(n_threads)
        for name, pinned, launching, copying in conditions:
            if time.perf_counter() > stop:
                break
            step = adamw_step(numel, pinned and cuda)
            with _beside_launching(device) if launching else _nothing(), \
                    Background(copier(device, 256 * 2**20)) if copying else _nothing():
                seconds = timed(step, steps)
            row = {"condition": name, "threads": n_threads, "elems_per_s": numel / seconds}
            result["rows"].append(row)
            G.log(f"{n_threads:3d} threads  {name:30s} {numel / seconds / 1e9:6.2f} G elements/s "
                  f"({seconds * 1e3:.1f} ms per step)")
            del step
    torch.set_num_threads(threads)
    G.write_json(args, "host-adamw", result)
    return 0


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
