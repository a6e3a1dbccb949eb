"""What an on-demand plan costs over the resident one, part by part, measured against the cost model, in one process.

`bench/bench_fidelity.py` compares whole steps, each plan in processes of its own. This script takes apart the
difference between a model's resident plan and its on-demand plan (the bench's chunks and 3 cache blocks) on one
rank, with four plans of the same model wrapped side by side in one process and stepping in turns (a step each per
round, so that differences within a round see the same moment of the machine):

  resident   every chunk resident, 32 MiB chunks
  small      every chunk resident, in the on-demand plan's chunks (what many chunks cost on their own)
  cached     those chunks on demand, the cache holding them all: every parameter use intercepted, each chunk
             fetched once per step, after its update
  ondemand   the bench's on-demand plan: 3 cache blocks, more fetches

It prints each plan's median step against its prediction, and each plan's extra over the one before it (median over
rounds of the difference) against the predicted extra. Then it times the runtime's own methods over --steps steps
of the on-demand plan (the shard's copy, the binding of the parameters as views, the eviction, the bookkeeping
around them) against what the cost model charges a fetch: the copy at the calibrated rate plus
`Hardware.fetch_overhead_s`.

    python bench/bench_fidelity_parts.py --models neox,opt,llama    # as in BENCHMARKS.md

The calibration is `Hardware.measure()` (this machine's cache, or a measurement), the model's compute scale its
block timed here. Ad hoc figures for one machine at one moment: the whole steps' fidelity is bench_fidelity's.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import time

import torch
from bench_fidelity import _block_inputs, build, chunk_sizes

import elixir
from elixir.hardware import Hardware
from elixir.memory import Chunk
from elixir.runtime.state import Runtime
from elixir.runtime.wrap import state_of
from elixir.search import simulate
from elixir.search.block import compute_scale

PARTS = ("resident", "small", "cached", "ondemand")
TIMED = ((Runtime, "acquire"), (Runtime, "_gather"), (Runtime, "_shard_into"), (Chunk, "bind"), (Runtime, "evict"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="neox,opt,llama", help="comma-separated bench_fidelity model names")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30, help="rounds of the four plans in turns")
    p.add_argument("--steps", type=int, default=15, help="steps of the on-demand plan with its methods timed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for what in ("rounds", "steps", "threads", "seq_len", "batch_size"):
        if getattr(args, what) < 1:
            p.error(f"--{what.replace('_', '-')}={getattr(args, what)} must be at least 1")
    return args


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _plans(name: str, base, args, hw: Hardware, prof) -> dict:
    """part -> (wrapped model, its optimizer, its prediction), each a fresh copy of model `name` (`base`, unwrapped,
    gives the chunk sizes)."""
    _, chunk_mib = chunk_sizes(base, 32, None)
    chunks = len(elixir.Plan.uniform(base, optimizer=_adamw(base), chunk_mib=chunk_mib, resident=True).chunks)
    kwargs = {"resident": dict(chunk_mib=32, resident=True), "small": dict(chunk_mib=chunk_mib, resident=True),
              "cached": dict(chunk_mib=chunk_mib, resident=False, cache_blocks=chunks + 1),
              "ondemand": dict(chunk_mib=chunk_mib, resident=False, cache_blocks=3)}
    out = {}
    for part in PARTS:
        model, _ = build(name, args.seq_len, 0)
        plan = elixir.Plan.uniform(model, optimizer=_adamw(model), **kwargs[part])
        wrapped, optim = elixir.wrap(model, _adamw(model), plan=plan)
        out[part] = (wrapped, optim, simulate(prof, plan, hw))
    return out


def _step(model, optim, batch) -> float:
    gc.collect()  # not inside the timed step
    started = time.perf_counter()
    model(**batch).loss.backward()
    optim.step()
    optim.zero_grad()
    return time.perf_counter() - started


def _methods_timed(model, optim, batch, steps: int) -> dict:
    """method -> (seconds per step, calls per step) over `steps` steps, each method wrapped by a timer."""
    seconds, calls = collections.Counter(), collections.Counter()
    saved = [(cls, name, getattr(cls, name)) for cls, name in TIMED]

    def timer(name, fn):
        def timed(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - started
                calls[name] += 1
        return timed

    try:
        for cls, name, fn in saved:
            setattr(cls, name, timer(name, fn))
        for _ in range(steps):
            _step(model, optim, batch)
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    return {name: (seconds[name] / steps, calls[name] / steps) for _, name, _ in saved}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hw = Hardware.measure()
    print(f"hardware: copy {hw.device_copy_bytes_per_s / 1e9:.1f} GB/s, fetch_overhead_s "
          f"{hw.fetch_overhead_s * 1e6:.0f} us, interception_op_s {hw.interception_op_s * 1e6:.2f} us; "
          f"{args.threads} thread(s), one rank")
    for name in args.models.split(","):
        block, _ = _block_inputs(name, args.seq_len, args.batch_size)
        scaled = hw.with_compute_scale(compute_scale(block, hw))
        base, vocab = build(name, args.seq_len, 0)
        x = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": x, "labels": x}
        prof = elixir.profile(base, batch)
        runs = _plans(name, base, args, scaled, prof)
        for model, optim, _ in runs.values():  # warm-up: caches allocated, every chunk's state made
            for _ in range(2):
                _step(model, optim, batch)
        before = {p: elixir.memory_stats(runs[p][0])["gathers"] for p in PARTS}
        times = {p: [] for p in PARTS}
        for _ in range(args.rounds):
            for p in PARTS:
                times[p].append(_step(runs[p][0], runs[p][1], batch))
        fetches = {p: (elixir.memory_stats(runs[p][0])["gathers"] - before[p]) / args.rounds for p in PARTS}
        print(f"\n{name} (compute scale {scaled.compute_scale:.2f}, {len(prof.ops)} operators, {args.rounds} rounds)")
        print("| plan | fetches per step | measured ms | predicted ms | extra over the plan before: measured | "
              "predicted |")
        print("|---|---:|---:|---:|---:|---:|")
        for i, p in enumerate(PARTS):
            pred = runs[p][2].step_s
            extra = ("", "")
            if i:
                q = PARTS[i - 1]
                extra = (f"{statistics.median(b - a for a, b in zip(times[q], times[p])) * 1e3:.2f}",
                         f"{(pred - runs[q][2].step_s) * 1e3:.2f}")
            print(f"| {p} | {fetches[p]:.1f} | {statistics.median(times[p]) * 1e3:.1f} | {pred * 1e3:.1f} | "
                  f"{extra[0]} | {extra[1]} |")
        whole = statistics.median(b - a for a, b in zip(times["resident"], times["ondemand"]))
        print(f"on demand over resident: measured {whole * 1e3:.2f} ms, predicted "
              f"{(runs['ondemand'][2].step_s - runs['resident'][2].step_s) * 1e3:.2f} ms")
        model, optim, _ = runs["ondemand"]
        chunks = state_of(model).runtime.chunks
        params = sorted(len(c.slots) for c in chunks)
        chunk_bytes = max(c.shard_numel * c.dtype.itemsize for c in chunks)
        timed = _methods_timed(model, optim, batch, args.steps)
        copy_s = chunk_bytes / scaled.device_copy_bytes_per_s
        print(f"the on-demand plan's methods over {args.steps} steps (parameters per chunk {params[0]}-{params[-1]}; "
              f"a fetch of {chunk_bytes / 2**20:.2f} MiB is charged {(copy_s + scaled.fetch_overhead_s) * 1e6:.0f} us: "
              f"its copy {copy_s * 1e6:.0f} us and {scaled.fetch_overhead_s * 1e6:.0f} us)")
        for method, (per_step, n) in timed.items():
            per_call = per_step / max(n, 1e-9)
            print(f"  {method:12s} {per_step * 1e3:6.2f} ms per step, {n:5.1f} calls, {per_call * 1e6:6.1f} us each")
        del runs, model, optim
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
