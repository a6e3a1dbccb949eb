"""Calibration of the machine at hand: `Hardware.measure()` and `measure_disk`, and the timings they make.

Each rate of the record is timed as the runtime does the work it stands for (GEMMs of a Linear layer's
training step, fused attention, AdamW, copies between buffers kept apart, the collectives of the runtime,
operators of a tiny transformer), taking the median of repeated runs (`_seconds`: see [Note: the typical
run, not the best]). A busy machine's
figures are used but not cached (`_machine_busy`). What a CPU-only machine's "device" is: see the
docstring of elixir/hardware/__init__.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import torch

from elixir import comm
from elixir.hardware.cache import (
    _cache_path,
    _disk_cache_path,
    _disk_cache_text,
    _read_cache,
    _read_disk_cache,
    _write_cache,
)
from elixir.hardware.machine import _cores, _device, _device_label, _local_ranks, _nodes, _spare_cores
from elixir.hardware.record import Hardware
from elixir.memory.host import keep_freed_host_memory


def _machine_busy() -> str:
    """Why the CPU is too busy to calibrate on, or "" when it is quiet: the 1-minute load average,
    less this job's own ranks on this machine, above half of the cores this process may use."""
    if not hasattr(os, "getloadavg"):
        return ""
    cores = _cores()
    own = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    load = os.getloadavg()[0]
    if load - own > 0.5 * cores:
        return f"load average {load:.1f} with {own} rank(s) of this job on {cores} core(s)"
    return ""


def measure_machine(*, cache: bool, quick: bool, refresh: bool, disk: str | None) -> Hardware:
    """`Hardware.measure()` (see its docstring): the cached calibration of this machine, or a new one."""
    keep_freed_host_memory()  # measured as the training process will run: [Note: freed host memory is kept]
    path = _cache_path(quick)
    cached = _read_cache(path) if cache and not refresh else None
    world = comm.rank_and_world()[1]
    usable = cached is not None and (world == 1 or world in cached.collective_bytes_per_s) and (
        _nodes() == 1 or cached.inter_node_bytes_per_s > 0)
    if world > 1:
        usable = comm.every_rank(usable, comm.world_group(), device=_device(),
                                 what="all-reduce of the calibration cache checks")
    if usable:
        assert cached is not None
        return _here(cached if disk is None else _with_measured_disk(cached, disk, cache, quick, refresh))
    busy = _machine_busy()
    hardware = _measure(quick)
    if busy:
        # rates measured while other work competes for the machine are low; using them for this run
        # is the best there is, but a cache would hand them to every later run
        warnings.warn(
            f"Hardware.measure(): the machine is busy ({busy}); the measured rates are used but not cached. "
            "Measure again on a quiet machine (Hardware.measure(refresh=True)) for figures later runs can trust",
            stacklevel=3,
        )
        cache = False
    if cached is not None:  # keep the collective figures of other world sizes
        merged = {**cached.collective_bytes_per_s, **hardware.collective_bytes_per_s}
        hardware = dataclasses.replace(hardware, collective_bytes_per_s=dict(sorted(merged.items())))
    if world > 1:
        # one calibration for the job: rank 0's. The ranks' own compute figures differ by their neighbours' load,
        # and ranks sharing a cache file would otherwise each write theirs, the last writer winning
        hardware = Hardware.from_json(comm.broadcast_object(hardware.to_json(), 0, comm.world_group(),
                                                            what="broadcast of rank 0's calibration"))
    if cache:
        _write_cache(path, hardware.to_json())
    if world > 1:  # every rank's cache file is written before any rank reads it again
        comm.every_rank(True, comm.world_group(), device=_device(), what="all-reduce after writing the calibration")
    return _here(hardware if disk is None else _with_measured_disk(hardware, disk, cache, quick, refresh))


def _here(hardware: Hardware) -> Hardware:
    """The record, marked as describing the device of this process (`Hardware.measured_here`)."""
    return dataclasses.replace(hardware, measured_here=True)


def measure_disk(folder: str, *, cache: bool = True, quick: bool = False, refresh: bool = False) -> tuple[float, float]:
    """(read, write) bytes/s of large sequential O_DIRECT transfers in `folder` (the whole machine's: ranks
    share it), as the disk tier does them. Cached per filesystem in cache_dir() like the other rates. The folder
    is made if it does not exist (it is the scratch folder the disk tier is about to use)."""
    os.makedirs(folder, exist_ok=True)
    path = _disk_cache_path(folder, quick)
    if cache and not refresh:
        cached = _read_disk_cache(path)
        if cached is not None:
            return cached
    read, write = _disk_bytes_per_s(folder, (64 if quick else 256) * 2**20)
    if cache and not _machine_busy():
        _write_cache(path, _disk_cache_text(folder, read, write))
    return read, write


def _with_measured_disk(hardware: Hardware, folder: str, cache: bool, quick: bool, refresh: bool) -> Hardware:
    read, write = measure_disk(folder, cache=cache, quick=quick, refresh=refresh)
    st = os.statvfs(folder)
    ranks = _local_ranks()
    return hardware.with_disk(disk_bytes=st.f_bavail * st.f_frsize // ranks, read_bytes_per_s=read / ranks,
                              write_bytes_per_s=write / ranks)


# [Note: the typical run, not the best]
# Calibration times each piece of work several times and keeps the median run, not the shortest. The cost
# model predicts the step a training run takes step after step, and that step is made of thousands of such
# pieces: it sees the machine's typical speed, not its luckiest moment. On a 2-core VM whose speed wanders
# by 15-30% within minutes, the shortest of 3-50 runs was 10-25% faster than the median (fp32 GEMMs of a
# 1024-wide Linear layer: 171 against 162 GFLOP/s; a 512-wide one 169 against 146), and predictions from it
# fell short of the measured step by 14% in the median over 25 model-calibration pairs (bench_fidelity's
# Hugging Face models), against 0% with the median. A busy machine's figures are still not cached
# (`_machine_busy`): the median is robust to a few slow runs, not to a neighbour that takes the cores.


def _seconds(fn: Callable[[], object], sync: Callable[[], None], *, min_total_s: float, max_reps: int = 50) -> float:
    """Median seconds of `fn` after one warm-up run, over runs repeated until `min_total_s` has passed (at
    least 3): see [Note: the typical run, not the best]."""
    fn()
    sync()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_total_s and len(times) < max_reps):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _matmul_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], sync, *, min_total_s: float,
                  slow_s: float, give_up_below: float = 0.0) -> tuple[float, dict[int, float]] | None:
    """(best FLOP/s, FLOP/s by the FLOPs of one product) over the three GEMMs of a square Linear layer's
    training step (y = x w^T + b, dx = dy w, dw = dy^T x: transposed operands and fresh outputs, as autograd
    runs them) of growing size; growing stops before a size whose runs would take well over `slow_s`. None when
    the device cannot multiply in `dtype`, or does it below `give_up_below` (float16 GEMM on most CPUs is scalar
    code: the smallest size says so)."""
    best, by_size = 0.0, {}
    for n in sizes:
        try:
            x, w, dy = (torch.randn(n, n, device=device).to(dtype) for _ in range(3))
            b = torch.randn(n, device=device).to(dtype)

            def linear(x=x, w=w, dy=dy, b=b):
                torch.addmm(b, x, w.t())
                torch.mm(dy, w)
                torch.mm(dy.t(), x)

            seconds = _seconds(linear, sync, min_total_s=min_total_s)
        except RuntimeError:
            return None
        by_size[2 * n**3] = 3 * 2 * n**3 / seconds
        best = max(best, by_size[2 * n**3])
        if best < give_up_below:
            return None
        if seconds * 8 > 4 * slow_s:  # the next size does 8x the work
            break
    return (best, by_size) if best else None


def _attention_flops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], sync, *,
                     min_total_s: float) -> float | None:
    """FLOP/s of a causal `scaled_dot_product_attention` forward and backward of (batch, heads, tokens, head
    size) `shape`, by torch.utils.flop_counter's formulas (those the profile counts); None if it cannot run."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    try:
        q, k, v = (torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, device=device).to(dtype)

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        seconds = _seconds(step, sync, min_total_s=min_total_s)
    except RuntimeError:
        return None
    return (sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)) / seconds


def _op_overhead_s(device: torch.device, sync, min_total_s: float) -> float:
    """Seconds per operator of a training step's forward and backward, beyond the kernels: a tiny transformer
    (2 blocks of width 32, 16 tokens), whose kernels take next to nothing, timed whole and divided by the
    operators the profiler counts in it. The per-operator cost of eager PyTorch in this process, with the
    Python of module calls around it."""
    from elixir.profile import profile

    model, batch = _tiny_transformer(device)
    ops = len(profile(model, batch).ops)

    def step():
        model(**batch).loss.backward()
        for p in model.parameters():
            p.grad = None

    return _seconds(step, sync, min_total_s=min_total_s) / ops


def _tiny_transformer(device: torch.device, n_layer: int = 2, *, width: int = 32, batch: int = 1, tokens: int = 16):
    """(model, batch) of a transformer so small that its kernels take next to nothing: what remains of its
    step is the cost of running operators at all. `width`, `batch` and `tokens` make it larger (see
    `_runtime_overheads`)."""
    from elixir.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=64, block_size=tokens, n_layer=n_layer, n_head=2, n_embd=width)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = GPT(cfg).to(device).train()
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    return model, {"input_ids": x, "labels": x}


# [Note: the runtime's overheads, among real kernels]
# Two costs of a plan with on-demand chunks are timed on wrapped transformers of the calibration's own, as the
# difference between their steps and those of the same model wrapped otherwise: the interception of every
# parameter use (`Hardware.interception_op_s`), and the runtime's own work per chunk fetch
# (`Hardware.fetch_overhead_s`). The models take turns, a step each per round, and each figure is the median
# over rounds of the difference within a round: steps a few milliseconds apart see the same machine, where
# medians taken model by model would subtract two moments of a machine whose speed wanders (see [Note: the
# typical run, not the best]).
# - The interception is timed on a transformer of width 256 (32 tokens, 2 blocks), whose parameters of 256 KiB
#   to 1 MiB pass through the caches between one operator and the next as a real model's do. On the transformer
#   of width 32 (16 tokens), whose data all stay in the caches, it came to 2.8-3.7 us per operator on the 2-core
#   CPU of BENCHMARKS.md (five medians of 25 rounds), and the wider one to 4.6-6.4 us in the same sitting; inside
#   the step of a Hugging Face Llama of width 256 the hooks ran at 2-3x their cost in the width-32 transformer.
#   With 64 tokens the wider model's steps take twice as long and its figure spread more (2.2-6.0 us in another
#   sitting, where 32 tokens gave 4.7-6.6). The calibration takes at least 16 rounds (~0.25 s).
# - The fetch is timed on the transformer of width 32 (4 blocks), chunks of one parameter each through a small
#   cache against one chunk that stays cached: its copies are a few KiB, so what is left is the runtime's
#   work, 29-32 us per fetch there. The wider model's fetches, which copy 0.6 MiB each, came to the same less
#   their copies' time at the calibrated rate (9-52 us), with more spread.
# - What the cost model charges a fetch on its own is left out of `fetch_overhead_s`: the shard's copy at the
#   calibrated copy rate and, with several ranks, the all-gather's fixed cost (`fetch_cost` in
#   elixir/search/cost.py), which two ranks of one thread each measured at about 1.7 ms of the 1.7 ms a fetch
#   took there (and which the cost model then charged twice).


def _wrapped_step(base: torch.nn.Module, batch: dict, device: torch.device, sync, **plan_kw):
    """(one step of a copy of `base` wrapped under `Plan.uniform(**plan_kw)`, the chunks that step fetches, the
    bytes of this rank's shards those fetches copy, whether the chunks are sharded over several ranks). The
    step runs SGD's `zero_grad` but no update: the shards never change, so a chunk that fits the cache stays
    there from step to step."""
    import copy

    from elixir.plan import Plan
    from elixir.runtime.wrap import memory_stats, wrap

    model = copy.deepcopy(base)
    optim = torch.optim.SGD(model.parameters(), lr=0.0)
    plan = Plan.uniform(model, optimizer=optim, **plan_kw)
    model, optim = wrap(model, optim, plan=plan, device=device)

    def step():
        model(**batch).loss.backward()
        optim.zero_grad()
        sync()

    step()
    before = memory_stats(model)
    step()
    after = memory_stats(model)
    return step, after["gathers"] - before["gathers"], after["fetch_bytes"] - before["fetch_bytes"], \
        plan.world_size > 1


def _differences(first, second, *, min_rounds: int, min_total_s: float) -> float:
    """Median over rounds of `second`'s seconds less `first`'s, the two taking turns (see [Note: the runtime's
    overheads, among real kernels]): at least `min_rounds` rounds, more until `min_total_s` has passed (at
    most 50)."""
    differences: list[float] = []
    started = time.perf_counter()
    while len(differences) < min_rounds or (time.perf_counter() - started < min_total_s and len(differences) < 50):
        seconds = []
        for step in (first, second):
            t = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t)
        differences.append(seconds[1] - seconds[0])
    return statistics.median(differences)


def _interception_op_s(device: torch.device, sync, min_total_s: float) -> float:
    """Seconds per operator of parameter interception: a transformer of width 256 wrapped all resident against
    one on-demand chunk that stays in the cache (every use intercepted, nothing fetched), over the operators of
    its step. See [Note: the runtime's overheads, among real kernels]."""
    from elixir.profile import profile

    base, batch = _tiny_transformer(device, n_layer=2, width=256, tokens=32)
    ops = len(profile(base, batch).ops)
    whole_mib = sum(p.numel() for p in base.parameters()) * 4 / 2**20
    resident, _, _, _ = _wrapped_step(base, batch, device, sync, chunk_mib=2 * whole_mib, resident=True)
    cached, fetches, _, _ = _wrapped_step(base, batch, device, sync, chunk_mib=2 * whole_mib, resident=False,
                                          cache_blocks=2)
    assert fetches == 0, f"the cached chunk was fetched {fetches} times in a step"
    return max(0.0, _differences(resident, cached, min_rounds=16, min_total_s=min_total_s) / ops)


def _fetch_overhead_s(device: torch.device, sync, min_total_s: float, copy_bytes_per_s: float) -> float:
    """Seconds of the runtime's own work per chunk fetch: the tiny transformer wrapped with chunks of one
    parameter through a small cache against one chunk that stays cached, per extra fetch, less what the cost
    model charges a fetch on its own (see [Note: the runtime's overheads, among real kernels])."""
    from elixir.search.cost import _COLLECTIVE_OVERHEAD_S

    base, batch = _tiny_transformer(device, n_layer=4)
    whole_mib = sum(p.numel() for p in base.parameters()) * 4 / 2**20
    largest_mib = max(p.numel() for p in base.parameters()) * 4 / 2**20
    cached, cached_fetches, cached_bytes, _ = _wrapped_step(base, batch, device, sync, chunk_mib=2 * whole_mib,
                                                            resident=False, cache_blocks=2)
    small, fetches, nbytes, sharded = _wrapped_step(base, batch, device, sync, chunk_mib=largest_mib,
                                                    resident=False, cache_blocks=4)
    fetches, nbytes = fetches - cached_fetches, nbytes - cached_bytes
    per_collective = _COLLECTIVE_OVERHEAD_S["cpu" if device.type == "cpu" else "gpu"] if sharded else 0.0
    charged = nbytes / copy_bytes_per_s + fetches * per_collective
    seconds = _differences(cached, small, min_rounds=5, min_total_s=min_total_s)
    return max(0.0, (seconds - charged) / max(fetches, 1))


def _eager_bytes_per_s(device: torch.device, sync, min_total_s: float, op_overhead_s: float, *,
                       numel: int) -> tuple[float, float]:
    """(bytes per second, bytes moved per operator) of memory-bound operators, as the profile counts them (see
    [Note: what a memory-bound operator costs] in elixir/profile/trace.py): the forward and backward of a
    transformer block's operators without matmuls (layer norm, GELU, a residual add, softmax, a concatenation,
    a sum) on `numel`-element activations, less the per-operator overhead."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from elixir.profile.trace import moved_bytes

    width = 256
    x = torch.randn(numel // width, width, device=device, requires_grad=True)
    w = torch.ones(width, device=device, requires_grad=True)
    b = torch.zeros(width, device=device, requires_grad=True)

    def step():
        y = F.layer_norm(x, (width,), w, b)
        y = F.gelu(y) + x
        z = torch.softmax(y, dim=-1)
        torch.cat([z, y], dim=-1).mul(0.5).sum().backward()
        x.grad = w.grad = b.grad = None

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops += 1
            self.bytes += moved_bytes(func, args, kwargs or {}, out)
            return out

    with Count() as count:
        step()
    seconds = _seconds(step, sync, min_total_s=min_total_s)
    return count.bytes / max(seconds - count.ops * op_overhead_s, seconds / 4), count.bytes / count.ops


def _grouped_mm_flops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], sync, *,
                      min_total_s: float) -> float | None:
    """FLOP/s of a `torch._grouped_mm` forward and backward as a Mixture-of-Experts layer runs it: (tokens,
    experts, in, out) `shape`, the tokens split evenly over the experts, each expert's weight stored (out, in)
    and used transposed; FLOPs by the profile's formula (elixir/profile/trace.py). None if it cannot run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from elixir.profile.trace import _grouped_mm_flop

    grouped = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped is None:
        return None
    tokens, experts, n_in, n_out = shape
    try:
        x = torch.randn(tokens, n_in, device=device).to(dtype).requires_grad_()
        w = torch.randn(experts, n_out, n_in, device=device).to(dtype).requires_grad_()
        offs = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * (tokens // experts)
        grad = torch.randn(tokens, n_out, device=device).to(dtype)

        def step():
            torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).backward(grad)
            x.grad = w.grad = None

        class Count(TorchDispatchMode):
            flops = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is grouped.default:
                    Count.flops += _grouped_mm_flop(*args, out_val=out, **(kwargs or {}))
                return out

        with Count():
            step()
        seconds = _seconds(step, sync, min_total_s=min_total_s)
    except (RuntimeError, NotImplementedError):
        return None
    return Count.flops / seconds if Count.flops else None


def _adamw_elems_per_s(device: torch.device, numel: int, sync, min_total_s: float) -> tuple[float, float]:
    """(elements per second, seconds per step call beyond its elements) of AdamW: a step on `numel` elements
    against one on a single element, whose time is the call's own (Python, state lookups, dispatch)."""

    def stepper(n: int):
        param = torch.zeros(n, device=device, requires_grad=True)
        param.grad = torch.randn(n, device=device)
        try:
            optim = torch.optim.AdamW([param], lr=1e-3, fused=True)
            optim.step()
        except RuntimeError:  # no fused kernel for this device: the default implementation
            optim = torch.optim.AdamW([param], lr=1e-3)
        return optim.step

    call = _seconds(stepper(1), sync, min_total_s=min_total_s / 10)
    seconds = _seconds(stepper(numel), sync, min_total_s=min_total_s)
    # the call's own cost is at most a small part of a step on millions of elements
    return numel / max(seconds - call, seconds / 2), call


def _host_bytes_per_s(numel: int, min_total_s: float) -> float:
    """Bytes per second of the host's memory-bound operators as the optimizer's worker runs them on a GPU machine
    before each update of a host chunk (`Hardware.host_bytes_per_s`): the fp32 gradient cast into a bf16 rollback
    log (4 bytes read, 2 written per element) and summed to find an inf or a NaN (4 read), on `numel` elements."""
    grad = torch.randn(numel)
    log = torch.empty(numel, dtype=torch.bfloat16)

    def run():
        log.copy_(grad)
        grad.sum()

    return numel * (4 + 2 + 4) / _seconds(run, lambda: None, min_total_s=min_total_s)


# [Note: the host's rates beside the compute thread]
# On a GPU machine the optimizer's worker updates host chunks while the training process's compute thread
# launches the model's kernels and, between them, waits in CUDA's synchronizes, which spin where the machine
# has more cores than devices: the worker's threads, one per core, share the cores with one more busy thread.
# On the H200 of BENCHMARKS.md the host's fused AdamW ran at 4.81 G elements/s alone and at 3.66 beside a
# thread launching small kernels without pause (bench/gpu/host_adamw.py), and the worker's updates inside
# steps ran at 0.76-0.95 of what the calibration, timing AdamW alone, had read on the same machine (three
# machines; bench/gpu/recorded): the searched plans, whose compute is shortest, were predicted 0.67-0.95 of
# their measured step. Calibration therefore times the host's rates (AdamW, and the cast and sum of
# `_host_bytes_per_s`) beside such a thread.
# Copies streaming both ways cost the host's AdamW more (2.14 G elements/s), but inside a step they run a
# fraction of the time and the rates above already match the steps; they are not added.
@contextlib.contextmanager
def _beside_launching(device: torch.device, *, launches: list[int] | None = None):
    """A thread launching small kernels on `device` without pause (200 at a time, then a synchronize) while
    the block runs, as the training process's compute thread does beside the optimizer's worker; `launches`
    (a one-element list) counts its kernels."""
    x = torch.ones(1024, device=device)
    stop = threading.Event()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    count = launches if launches is not None else [0]

    def launch() -> None:
        while not stop.is_set():
            for _ in range(200):
                x.mul_(1.0)
            count[0] += 200
            sync()

    thread = threading.Thread(target=launch, name="elixir-calibration-launcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _copy_bytes_per_s(dst: torch.Tensor, src: torch.Tensor, sync, min_total_s: float) -> float:
    non_blocking = dst.is_cuda != src.is_cuda
    return src.numel() * src.element_size() / _seconds(
        lambda: dst.copy_(src, non_blocking=non_blocking), sync, min_total_s=min_total_s
    )


def _collective_seconds(fn: Callable[[], object], sync, world, *, min_total_s: float, max_reps: int = 50) -> float:
    """`_seconds` for a collective: every rank of `world` (a ChunkGroup of the whole job) runs `fn` the same
    number of times, so that no rank waits in a collective the others have left (a rank's own sum of times
    would decide differently from its peers'). The count comes from the slowest rank's warm-up run; the
    result is the slowest rank's median run after it."""
    import math

    started = time.perf_counter()
    fn()  # the warm-up, timed only for the count
    sync()
    first = _slowest([time.perf_counter() - started], world)[0]
    reps = min(max_reps, max(3, math.ceil(min_total_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return _slowest([statistics.median(times)], world)[0]


def _slowest(seconds: list[float], world) -> list[float]:
    """Each of `seconds`, the largest over the ranks of `world` (ranks time slightly different runs; the
    slowest decides a collective's time)."""
    import torch.distributed as dist

    t = torch.tensor(seconds, dtype=torch.float64, device=_device() if _device().type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.process_group)
    return t.tolist()


def _collective_figures(device: torch.device, numel: int, sync, min_total_s: float) -> dict:
    """The Hardware fields of communication: `collective_bytes_per_s` of the world's all-gather and
    reduce-scatter, and when the job spans several nodes (as every rank agrees from torchrun's environment,
    see elixir/parallel/nodes.py) the two levels of `Hardware.bus_rate` too: the collectives inside a node
    (`collective_bytes_per_s` of the node's ranks, `intra_node_latency_s`) and across nodes
    (`inter_node_bytes_per_s`, `inter_node_latency_s`). {} for a single process. Collective over the world:
    every rank makes the same groups and collectives in the same order."""
    if comm.rank_and_world()[1] < 2:
        return {}
    from elixir.parallel.nodes import agreed_node_layout

    world = comm.world_group()
    try:  # the same answer on every rank: a launch that says nothing usable is measured as one node
        layout = agreed_node_layout(world)
    except ValueError:
        layout = None
    if layout is None or layout.nodes == 1:
        return {"collective_bytes_per_s": _collective_bytes_per_s(device, world, numel, sync, min_total_s)}
    # about the time of one node's calibration in all: half the time and a quarter of the bytes for the
    # world's collectives (across nodes they share no memory, so they run slower than one node's), half the
    # time for the two levels
    rates = _collective_bytes_per_s(device, world, numel // 4, sync, min_total_s / 2, node=layout.node_rank)
    network = _network_figures(device, world, layout, numel, sync, min_total_s / 2)
    network["collective_bytes_per_s"] = dict(sorted({**network["collective_bytes_per_s"], **rates}.items()))
    return network


def _collective_bytes_per_s(device: torch.device, group, numel: int, sync, min_total_s: float,
                            node: int | None = None) -> dict[int, float]:
    """Bus bandwidth per rank of the runtime's all-gather and reduce-scatter over `group`, the slower of
    the two, by the group's size; `node`: this rank's node (ranks of different nodes share no memory)."""
    from elixir.comm import all_gather, reduce_scatter_mean
    from elixir.shm import SharedArena

    size, rank = group.size, group.rank
    numel -= numel % size
    # the buffers the runtime communicates from: in shared memory where ranks share a host (elixir/shm.py)
    arena = SharedArena.create(group, node=node) if device.type == "cpu" else None
    full = arena.empty(numel, torch.float32) if arena is not None else torch.zeros(numel, device=device)
    n = numel // size
    own = full[rank * n : (rank + 1) * n]
    shard = torch.zeros(n, device=device)
    nbytes = full.numel() * full.element_size()
    world = comm.world_group()
    gather = _collective_seconds(lambda: all_gather(full, own, group, arena=arena), sync, world,
                                 min_total_s=min_total_s)
    scatter = _collective_seconds(lambda: reduce_scatter_mean(shard, full, group, arena=arena), sync, world,
                                  min_total_s=min_total_s)
    bus = (size - 1) / size * nbytes
    return {size: bus / max(gather, scatter)}


def _network_figures(device: torch.device, world, layout, numel: int, sync, min_total_s: float) -> dict:
    """The two levels of a job on `layout.nodes` nodes, timed over the groups that chunks sharded inside nodes
    use (`nodes.node_groups`, made once; see [Note: hierarchical sharding]), every node and every replica
    group at once, as a training step runs them:
    - inside a node: the all-gather and reduce-scatter of the node's ranks (its `collective_bytes_per_s`
      entry) and a one-element all-gather, whose time per ring step is `intra_node_latency_s`;
    - across nodes: the all-reduce of a node shard's fp32 gradient over its replicas (one rank per node),
      every local rank's at once, so that the node's ranks share its links as `Hardware.bus_rate` says:
      `inter_node_bytes_per_s` is the node's total, its ranks' bus bandwidths together; a one-element
      all-reduce's time per ring step (2 (N - 1) of them) is `inter_node_latency_s`.
    Each of the five timings (the node's all-gather, its reduce-scatter, the replicas' all-reduce and the
    two one-element collectives) gets a fifth of `min_total_s`, on buffers half the world's."""
    from elixir.comm import all_gather, all_reduce_sum
    from elixir.parallel.nodes import node_groups

    budget = min_total_s / 5
    mine = node_groups(world, layout, {id(world): world})[id(world)]
    inside = dataclasses.replace(mine, mean_over=1, replicas=None)
    across = mine.replicas
    out: dict = {"collective_bytes_per_s": {}}
    per_node, nodes = layout.ranks_per_node, layout.nodes
    if per_node > 1:
        out["collective_bytes_per_s"] = _collective_bytes_per_s(device, inside, numel // 2, sync, budget,
                                                                node=layout.node_rank)
        one, few = torch.zeros(1, device=device), torch.zeros(per_node, device=device)
        tiny = _collective_seconds(lambda: all_gather(few, one, inside), sync, world, min_total_s=budget)
        out["intra_node_latency_s"] = tiny / (per_node - 1)
    shard = torch.zeros(max(1, numel // per_node // 2), device=device)
    reduce = _collective_seconds(lambda: all_reduce_sum(shard, across), sync, world, min_total_s=budget)
    bus = 2 * (nodes - 1) / nodes * shard.numel() * shard.element_size() / reduce
    out["inter_node_bytes_per_s"] = bus * per_node
    one = torch.zeros(1, device=device)
    tiny = _collective_seconds(lambda: all_reduce_sum(one, across), sync, world, min_total_s=budget)
    out["inter_node_latency_s"] = tiny / (2 * (nodes - 1))
    return out


def _disk_bytes_per_s(folder: str, nbytes: int) -> tuple[float, float]:
    """Write then read `nbytes` in 8 MiB blocks of a temporary file with O_DIRECT (buffered where the
    filesystem refuses it, then the page cache flatters the read); best of two passes each."""
    import mmap
    import tempfile

    block = 8 * 2**20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    fd_tmp, name = tempfile.mkstemp(prefix="elixir-disk-measure-", dir=folder)
    os.close(fd_tmp)
    try:
        try:
            fd = os.open(name, os.O_RDWR | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(name, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            times = {"write": [], "read": []}
            for _ in range(2):
                started = time.perf_counter()
                for off in range(0, nbytes, block):
                    os.pwrite(fd, buf, off)
                os.fdatasync(fd)
                times["write"].append(time.perf_counter() - started)
                started = time.perf_counter()
                for off in range(0, nbytes, block):
                    os.preadv(fd, [buf], off)
                times["read"].append(time.perf_counter() - started)
        finally:
            os.close(fd)
    finally:
        os.unlink(name)
    return nbytes / min(times["read"]), nbytes / min(times["write"])


def _memory_bytes(device: torch.device) -> tuple[int, int]:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, ram // max(1, torch.cuda.device_count())
    return ram // 2, ram // 2


def _measure(quick: bool) -> Hardware:
    device = _device()
    on_gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    min_total_s = 0.05 if quick else 0.5
    slow_s = 0.05 if quick else 0.25
    mib = 2**20
    # Copies and AdamW on buffers well beyond the last-level cache (a GPU's L2 is 40-50 MiB, a server CPU's L3
    # up to a few hundred), as the shards of a model are: in-cache figures would flatter both.
    if on_gpu:
        # from 1024 on: the products of a model a few thousand wide run well below a large product's rate
        sizes, copy_bytes, adam_numel = ((1024, 2048) if quick else (1024, 2048, 4096, 8192)), 256 * mib, 2**24
        attention = (4, 16, 1024, 128) if quick else (8, 16, 2048, 128)
    else:
        sizes, copy_bytes, adam_numel = ((256, 512) if quick else (256, 512, 1024)), 64 * mib, 2**23
        attention = (2, 8, 256, 64) if quick else (4, 8, 512, 64)
    if quick:
        copy_bytes, adam_numel = copy_bytes // 4, adam_numel // 4

    matmul: dict[str, float] = {}
    matmul_by_size: dict[str, dict[int, float]] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if on_gpu and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        # A CPU without AVX512-FP16/AMX runs float16 GEMM as scalar code, ~50x slower: not a real option.
        give_up_below = 0.25 * max(matmul.values(), default=0.0) if dtype == torch.float16 and not on_gpu else 0.0
        rate = _matmul_flops(
            device, dtype, sizes, sync, min_total_s=min_total_s, slow_s=slow_s, give_up_below=give_up_below
        )
        if rate is not None:
            matmul[str(dtype).removeprefix("torch.")], matmul_by_size[str(dtype).removeprefix("torch.")] = rate
    attention_flops: dict[str, float] = {}
    for name in matmul:
        # a dtype whose GEMMs run at under a quarter of the best (bf16 on a CPU without AMX or AVX512-BF16) is
        # timed on a smaller shape: a few repetitions of the full one would take seconds, for a rate no plan uses
        slow = matmul[name] < max(matmul.values()) / 4
        shape = (attention[0] // 2, attention[1], attention[2] // 2, attention[3]) if slow else attention
        rate = _attention_flops(device, getattr(torch, name), shape, sync, min_total_s=min_total_s)
        if rate is not None:
            attention_flops[name] = rate
    # MoE experts: tokens split over 4 experts, Mixtral's shapes at a tenth of their width on a CPU
    grouped_shape = (8192, 8, 1024, 4096) if on_gpu else (1024, 4, 256, 1024)
    grouped_mm_flops: dict[str, float] = {}
    for name in matmul:
        if matmul[name] < max(matmul.values()) / 4:
            continue  # a dtype no plan computes in (see above): the matmul rate stands in
        rate = _grouped_mm_flops(device, getattr(torch, name), grouped_shape, sync, min_total_s=min_total_s / 5)
        if rate is not None:
            grouped_mm_flops[name] = rate

    numel = copy_bytes // 4
    # Distinct buffers for the two sides, also on a CPU-only machine where both are RAM; pinned staging on a
    # GPU (only this one buffer, freed on return).
    host = torch.ones(numel, pin_memory=on_gpu)
    on_device = torch.ones(numel, device=device)
    other_on_device = torch.ones(numel, device=device)
    h2d = _copy_bytes_per_s(on_device, host, sync, min_total_s)
    d2h = _copy_bytes_per_s(host, on_device, sync, min_total_s)
    device_copy = _copy_bytes_per_s(other_on_device, on_device, sync, min_total_s)
    del host, on_device, other_on_device

    # steps of milliseconds: a fifth of the time gives tens of repetitions, enough for their minimum
    op_overhead = _op_overhead_s(device, sync, min_total_s / 5)
    interception = _interception_op_s(device, sync, min_total_s / 5)
    fetch_overhead = _fetch_overhead_s(device, sync, min_total_s / 5, device_copy)
    # memory-bound operators at several sizes: in the caches and streaming from memory (`Hardware.eager_rates`);
    # `eager_bytes_per_s` stays the figure of 2**20-element activations (2**24 on a GPU)
    scale = 16 if on_gpu else 1
    eager_rates, eager = {}, 0.0
    for numel in ((2**16, 2**18, 2**20) if quick else (2**16, 2**18, 2**20, 2**22)):
        rate, per_op = _eager_bytes_per_s(device, sync, min_total_s / 10, op_overhead, numel=numel * scale)
        eager_rates[int(per_op)] = rate
        if numel == 2**20:
            eager = rate

    device_optim, optim_call = _adamw_elems_per_s(device, adam_numel, sync, min_total_s)
    # A GPU machine's host: 2 GB of AdamW parameter, gradient and moments (2**27 elements), 1.5 GB of casts and
    # sums, beyond a server's last-level cache (up to ~1 GB with stacked cache), as the worker's chunks and their
    # gradients are. On the H200 of BENCHMARKS.md 2**24 elements (256 MB with the moments) ran AdamW at 8.3 G
    # elements/s and the cast and sum at 165 GB/s, where the worker's updates inside a step ran at ~3.6 G and
    # ~50 GB/s. Both are timed beside a thread launching kernels: [Note: the host's rates beside the compute
    # thread]. A CPU device's host is the device (its casts are priced by `eager_rates`).
    host_optim, host_stream = device_optim, 0.0
    if on_gpu:
        with _beside_launching(device):
            host_optim = _adamw_elems_per_s(torch.device("cpu"), 8 * adam_numel, lambda: None, min_total_s)[0]
            host_stream = _host_bytes_per_s(16 * adam_numel, min_total_s / 2)
    device_bytes, host_bytes = _memory_bytes(device)
    return Hardware(
        name=f"measured: {_device_label(device)}",
        device_type=device.type,
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        matmul_flops=matmul,
        matmul_by_size=matmul_by_size,
        h2d_bytes_per_s=h2d,
        d2h_bytes_per_s=d2h,
        **_collective_figures(device, numel, sync, min_total_s),
        device_optim_elems_per_s=device_optim,
        host_optim_elems_per_s=host_optim,
        device_copy_bytes_per_s=device_copy,
        attention_flops=attention_flops,
        grouped_mm_flops=grouped_mm_flops,
        op_overhead_s=op_overhead,
        eager_bytes_per_s=eager,
        eager_rates=eager_rates,
        interception_op_s=interception,
        fetch_overhead_s=fetch_overhead,
        optim_step_overhead_s=optim_call,
        host_bytes_per_s=host_stream,
        spare_cores=_spare_cores(),
    )
