"""Steps with freed host memory kept against glibc's defaults (see [Note: freed host memory is kept] in
elixir/memory/host.py).

Pairs of processes take turns, one with `ELIXIR_KEEP_HOST_MEMORY=1` (the default) and one with `=0`: each builds
a bench_fidelity model, wraps it with one of its plans (or runs it as plain PyTorch), runs warm-up steps and
then times steps, counting the minor page faults of each. Prints per pair the median step and faults of both and
their ratio, then the median over the pairs.

    python bench/bench_malloc.py --model opt --plan host --pairs 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def one_process(model_name: str, plan_name: str, steps: int, warmup: int) -> dict:
    import torch
    from bench_fidelity import build, chunk_sizes

    import elixir

    torch.set_num_threads(2)
    model, vocab = build(model_name, 128, 0)
    x = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(1))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if plan_name != "pytorch":
        _, ondemand_mib = chunk_sizes(model, 32, None)
        kw = {"resident": dict(chunk_mib=32, resident=True),
              "host": dict(chunk_mib=ondemand_mib, cache_blocks=4, resident=False, param_home="host",
                           optim_home="host")}[plan_name]
        model, optim = elixir.wrap(model, optim, plan=elixir.Plan.uniform(model, optimizer=optim, **kw))
    elif os.environ.get("ELIXIR_KEEP_HOST_MEMORY", "1") != "0":
        from elixir.memory.host import keep_freed_host_memory

        keep_freed_host_memory()  # what wrap would do

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"step_s": statistics.median(times), "faults": statistics.median(faults)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt", help="a bench_fidelity model (default: opt)")
    p.add_argument("--plan", default="host", choices=("host", "resident", "pytorch"),
                   help="bench_fidelity's host or resident plan, or plain PyTorch (default: host)")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_process(args.model, args.plan, args.steps, args.warmup)))
        return 0
    print(f"{args.model}, {args.plan}, {args.pairs} pairs of processes, median of {args.steps} steps each after "
          f"{args.warmup} warm-up steps; load average {os.getloadavg()[0]:.2f}")
    ratios = []
    for pair in range(args.pairs):
        got = {}
        for keep in ("1", "0"):
            out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--plan", args.plan,
                                  "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                 env={**os.environ, "ELIXIR_KEEP_HOST_MEMORY": keep}, check=True,
                                 capture_output=True, text=True).stdout
            got[keep] = json.loads(out.strip().splitlines()[-1])
        ratios.append(got["1"]["step_s"] / got["0"]["step_s"])
        print(f"pair {pair + 1}: kept {got['1']['step_s'] * 1e3:.1f} ms ({got['1']['faults']:.0f} faults/step), "
              f"glibc's defaults {got['0']['step_s'] * 1e3:.1f} ms ({got['0']['faults']:.0f} faults/step), "
              f"ratio {ratios[-1]:.2f}", flush=True)
    print(f"kept / defaults: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"faster in {sum(r < 1 for r in ratios)} of {len(ratios)} pairs; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
