"""Where a model's step time goes, operator by operator: the cost model's seconds against the measured ones.

In one process: a plain PyTorch step of a bench_fidelity model (fp32, fused AdamW, freed host memory kept as
`wrap` keeps it), a fresh calibration (`Hardware.measure(cache=False)`), the cost model's seconds of every operator
of the profiled step (its kernel: FLOPs at the rate for their size, fused attention at its rate, the bytes a
memory-bound operator moves at the rate for their size; without the per-operator overhead), and each operator's
measured seconds (a `TorchDispatchMode` timing every call, 3 steps). Then the step's matrix products timed again
alone (the same shapes and layouts, 30 runs each) right after the step's, for `--rounds` rounds: how much longer
the products take inside the step than alone.

    python bench/bench_ops.py --model opt
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt", help="a bench_fidelity model (default: opt)")
    p.add_argument("--rows", type=int, default=8, help="operators shown, the largest first")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    from bench_fidelity import build
    from torch.utils._python_dispatch import TorchDispatchMode

    import elixir
    from elixir.hardware import Hardware
    from elixir.memory.host import keep_freed_host_memory

    keep_freed_host_memory()
    torch.set_num_threads(2)
    model, vocab = build(args.model, 128, 0)
    x = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(1))
    prof = elixir.profile(model, {"input_ids": x, "labels": x})
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    gemms: dict[tuple, list[float]] = collections.defaultdict(list)

    def column_major(t) -> bool:
        return t.stride(0) == 1 and t.stride(1) != 1

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            started = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            took = time.perf_counter() - started
            seconds[str(func)] += took
            calls[str(func)] += 1
            if func in products:
                a, b = (args[0], args[1]) if func is products[0] else (args[1], args[2])
                gemms[(a.shape[0], a.shape[1], b.shape[1], column_major(a), column_major(b))].append(took)
            return out

    for _ in range(3):
        step()
    hw = Hardware.measure(cache=False)
    predicted: collections.Counter = collections.Counter()
    for op in prof.ops:
        if op.flops:
            if "attention" in op.name:
                predicted[op.name] += op.flops / hw.attention_rate("float32")
            elif "grouped_mm" in op.name:
                predicted[op.name] += op.flops / hw.grouped_mm_rate("float32")
            else:
                predicted[op.name] += op.flops / hw.matmul_rate("float32", op.flops)
        else:
            moved = op.out_bytes * 2 if op.moved_bytes is None else op.moved_bytes
            predicted[op.name] += moved / hw.eager_rate(moved) if moved else 0.0
    with Timer():
        for _ in range(3):
            step()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    n_ops = len(prof.ops)
    print(f"{args.model}: {n_ops} operators; step measured {statistics.median(times) * 1e3:.1f} ms (median of 5, "
          f"AdamW included); predicted kernels {sum(predicted.values()) * 1e3:.1f} ms + {hw.op_overhead_s * 1e6:.1f} "
          f"us x {n_ops} operators = {(sum(predicted.values()) + hw.op_overhead_s * n_ops) * 1e3:.1f} ms; fp32 GEMMs "
          f"{hw.matmul_flops['float32'] / 1e9:.0f} GFLOP/s")
    print("| operator | calls per step | predicted ms | measured ms |")
    print("|---|---:|---:|---:|")
    for name in sorted(set(predicted) | set(seconds), key=lambda k: -max(predicted[k], seconds[k] / 3))[:args.rows]:
        print(f"| `{name}` | {calls[name] // 3} | {predicted[name] * 1e3:.2f} | {seconds[name] / 3 * 1e3:.2f} |")

    def alone(shape) -> float:
        m, k, n, a_t, b_t = shape
        a = torch.randn(k, m).t() if a_t else torch.randn(m, k)
        b = torch.randn(n, k).t() if b_t else torch.randn(k, n)
        torch.mm(a, b)
        runs = []
        for _ in range(30):
            started = time.perf_counter()
            torch.mm(a, b)
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    for rnd in range(args.rounds):
        gemms.clear()
        with Timer():
            for _ in range(2):
                step()
        by_alone = {shape: alone(shape) for shape in gemms}
        in_step = sum(statistics.median(v) * len(v) / 2 for v in gemms.values())
        by_itself = sum(by_alone[s] * len(v) / 2 for s, v in gemms.items())
        rates = [2 * s[0] * s[1] * s[2] / t / 1e9 for s, t in by_alone.items()]
        print(f"round {rnd + 1}: the step's matrix products {in_step * 1e3:.1f} ms in the step, "
              f"{by_itself * 1e3:.1f} ms alone: {in_step / by_itself:.2f}x; alone {min(rates):.0f}-{max(rates):.0f} "
              "GFLOP/s by shape")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
