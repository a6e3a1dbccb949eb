"""Planner fidelity: the cost model's predicted step time and model-data device bytes against the runtime.

For the reference GPT (default the ~50M preset, fp32, fused AdamW, batch 4 x 256) and several plans, the
script predicts one step with `elixir.search.simulate(profile, plan, Hardware.measure())` and measures it: the
median step time over several steps after warm-up (plans alternate, one step each per repetition, in rotating
order, as docs/architecture.md, "How we measure", asks) and `elixir.memory_stats(model)["device_bytes_peak"]`,
the runtime's peak of model data over the whole run (nothing is reset: the cost model predicts the same
counter, activations excluded). Plans:

  resident   every chunk resident, homes on the device (chunk_mib 32)
  ondemand   every chunk gathered on demand into a small cache, homes on the device (8 MiB, 3 blocks)
  host       every chunk on demand, parameter and optimizer homes on the host (8 MiB, 4 blocks)
  searched   what `search()` returns when the device may hold ~60% of the all-resident plan's
             predicted device bytes (`Hardware.with_memory(device_bytes=...)`)

Targets: step time within 20% of the measurement, device bytes within 10%. The machine is shared: the
script waits for the 1-minute load average to fall below --max-load and for other jobs to use under
--max-busy of the CPUs before it measures, waits again before every repetition while other jobs are busy
(--max-wait-s of waiting in all), and prints what other jobs used during each repetition (the machine's busy
time less this process's). It calibrates `Hardware.measure(refresh=True)` at the start, on the quiet machine,
again if other jobs took the CPUs meanwhile (--cached-hardware reads the cache instead: every elixir process
on the machine shares it, measured under whatever load there was).
Every plan computes the same fp32 math from the same weights on the same batch, so the losses of all plans
must agree (checked).

    python bench/bench_fidelity.py                            # 50m, batch 4 x 256, 7 reps
    python bench/bench_fidelity.py --reps 9 --json out.json   # as in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

import elixir
from elixir.hardware import Hardware
from elixir.models import GPT, GPTConfig
from elixir.search import PlanDoesNotFitError, search, simulate

MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="50m", help=f"GPT preset ({', '.join(GPTConfig.preset_names())})")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=7, help="repetitions; each runs one step of every plan")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per plan before the first repetition")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resident-chunk-mib", type=float, default=32.0)
    p.add_argument("--ondemand-chunk-mib", type=float, default=8.0)
    p.add_argument("--ondemand-cache-blocks", type=int, default=3)
    p.add_argument("--host-cache-blocks", type=int, default=4)
    p.add_argument("--budget-fraction", type=float, default=0.6,
                   help="device memory for the searched plan, as a fraction of the all-resident plan's "
                        "predicted device bytes (model data and activations)")
    p.add_argument("--cached-hardware", action="store_true",
                   help="use the cached Hardware.measure() instead of calibrating again (refresh=True) at the start; "
                        "the cache is shared with every elixir process on the machine, whatever its load was")
    p.add_argument("--max-load", type=float, default=2.0,
                   help="before measuring, wait until the 1-minute load average is below this")
    p.add_argument("--max-busy", type=float, default=0.25,
                   help="before measuring and before every repetition, wait until other jobs use less than this "
                        "share of the CPUs (sampled for 2 s while this process sleeps)")
    p.add_argument("--max-wait-s", type=float, default=600.0,
                   help="waiting for quiet takes at most this long over the whole run; then it measures anyway")
    p.add_argument("--time-target", type=float, default=0.20)
    p.add_argument("--memory-target", type=float, default=0.10)
    p.add_argument("--rtol", type=float, default=1e-5, help="largest relative loss difference between plans")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "reps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.budget_fraction < 1:
        p.error("--budget-fraction must be between 0 and 1")
    return args


def _cpu_jiffies() -> tuple[int, int]:
    """(all, idle) jiffies of the machine's CPUs since boot (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


class OthersWatch:
    """Share of all CPUs that other processes used between `start()` and `stop()`: the machine's busy time
    (/proc/stat) less this process's own CPU time. 0.0 where /proc/stat cannot be read."""

    def start(self) -> OthersWatch:
        try:
            self._jiffies = _cpu_jiffies()
        except (OSError, ValueError, IndexError):
            self._jiffies = None
        self._own, self._wall = time.process_time(), time.monotonic()
        return self

    def stop(self) -> float:
        if self._jiffies is None:
            return 0.0
        total, idle = _cpu_jiffies()
        busy_s = ((total - self._jiffies[0]) - (idle - self._jiffies[1])) / os.sysconf("SC_CLK_TCK")
        own_s = time.process_time() - self._own
        capacity_s = (time.monotonic() - self._wall) * (os.cpu_count() or 1)
        return min(1.0, max(0.0, (busy_s - own_s) / max(capacity_s, 1e-9)))


def others_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs other jobs use over `seconds` while this process sleeps."""
    watch = OthersWatch().start()
    time.sleep(seconds)
    return watch.stop()


class Quiet:
    """Waits for the machine to be quiet: before the run the 1-minute load average below `max_load` and other
    jobs using under `max_busy` of the CPUs; between repetitions the latter only (the load average still
    counts this process's own steps for a minute). At most `max_wait_s` of waiting over the whole run."""

    def __init__(self, max_load: float, max_busy: float, max_wait_s: float):
        self.max_load, self.max_busy, self.budget = max_load, max_busy, max_wait_s
        self.waited_s = 0.0

    def wait(self, check_load: bool) -> float:
        """Wait until quiet (or the budget is spent); returns the share of CPUs other jobs used last."""
        while True:
            busy = others_busy()
            load = os.getloadavg()[0]
            quiet = busy < self.max_busy and (not check_load or load < self.max_load)
            if quiet or self.waited_s >= self.budget:
                return busy
            print(f"other jobs use {busy:.0%} of the CPUs (load {load:.2f}): waiting "
                  f"({self.waited_s:.0f} of {self.budget:.0f} s spent)", flush=True)
            time.sleep(8.0)
            self.waited_s += 10.0


class Run:
    def __init__(self, name: str, description: str, plan: elixir.Plan, model, optim):
        self.name, self.description, self.plan = name, description, plan
        self.model, self.optim = model, optim
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self.pred = None

    def step(self, x: torch.Tensor) -> float:
        started = time.perf_counter()
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.optim.step()
        self.optim.zero_grad()
        seconds = time.perf_counter() - started
        self.losses.append(float(loss.detach()))
        return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    quiet = Quiet(args.max_load, args.max_busy, args.max_wait_s)
    busy_before = quiet.wait(check_load=True)
    load_before = os.getloadavg()[0]
    if args.cached_hardware:
        hw, busy_calibrating = Hardware.measure(), None
    else:
        # calibrate now, while the machine is quiet; again if other jobs took the CPUs meanwhile
        while True:
            watch = OthersWatch().start()
            hw = Hardware.measure(refresh=True)
            busy_calibrating = watch.stop()
            if busy_calibrating < args.max_busy or quiet.waited_s >= quiet.budget:
                break
            print(f"other jobs used {busy_calibrating:.0%} of the CPUs while calibrating: again", flush=True)
            quiet.wait(check_load=False)
    print(f"hardware: {hw.name}: matmul fp32 {hw.matmul_flops['float32'] / 1e9:.0f} GFLOP/s, copy "
          f"{hw.device_copy_bytes_per_s / 1e9:.1f} GB/s, h2d {hw.h2d_bytes_per_s / 1e9:.1f} GB/s, AdamW "
          f"{hw.device_optim_elems_per_s / 1e9:.2f} G elements/s"
          + (f", memory-bound ops {hw.eager_op_bytes_per_s / 1e9:.1f} GB/s" if hasattr(hw, "eager_op_bytes_per_s")
             else ""))

    torch.manual_seed(args.seed)
    cfg = GPTConfig.preset(args.model)
    if args.seq_len > cfg.block_size:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the {args.model} preset's block_size {cfg.block_size}")
    base = GPT(cfg).train()
    n_params = base.num_params()
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": x, "labels": x}
    prof = elixir.profile(base, batch)

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    # the plans
    plans: list[tuple[str, str, elixir.Plan]] = []
    uniform = [
        ("resident", f"all resident, homes on device ({args.resident_chunk_mib:g} MiB chunks)",
         dict(chunk_mib=args.resident_chunk_mib, resident=True)),
        ("ondemand", f"on demand, homes on device ({args.ondemand_chunk_mib:g} MiB, "
                     f"{args.ondemand_cache_blocks} blocks)",
         dict(chunk_mib=args.ondemand_chunk_mib, cache_blocks=args.ondemand_cache_blocks, resident=False)),
        ("host", f"on demand, homes on host ({args.ondemand_chunk_mib:g} MiB, {args.host_cache_blocks} blocks)",
         dict(chunk_mib=args.ondemand_chunk_mib, cache_blocks=args.host_cache_blocks, resident=False,
              param_home="host", optim_home="host")),
    ]
    for name, description, kw in uniform:
        plans.append((name, description, elixir.Plan.uniform(base, optimizer=adamw(base), **kw)))
    resident_pred = simulate(prof, plans[0][2], hw)
    budget = int(args.budget_fraction * resident_pred.device_bytes_peak)
    try:
        searched, _ = search(prof, hw.with_memory(device_bytes=budget))
    except PlanDoesNotFitError as e:  # a small model: activations alone take most of the budget
        print(f"searched: no plan under a {budget / MiB:.0f} MiB device budget, left out: {e}")
    else:
        searched = dataclasses.replace(searched, use_order=tuple(prof.use_sequence()))
        plans.append(("searched", f"search() under a {budget / MiB:.0f} MiB device budget "
                                  f"({args.budget_fraction:.0%} of all-resident)", searched))

    runs: list[Run] = []
    for name, description, plan in plans:
        model = copy.deepcopy(base)
        optim = adamw(model)
        model, optim = elixir.wrap(model, optim, plan=plan)
        run = Run(name, description, plan, model, optim)
        run.pred = simulate(prof, plan, hw)
        runs.append(run)
    del base

    print(f"model {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch_size} x {args.seq_len}, fp32, "
          f"AdamW(fused), {args.threads} threads, torch {torch.__version__}")
    for r in runs:
        print(f"  {r.name}: {r.description}; {len(r.plan.chunks)} chunks")
        print("    " + r.plan.summary().replace("\n", "\n    "))

    for r in runs:
        for _ in range(args.warmup):
            r.step(x)
    loads, busy = [], []
    order = list(runs)
    for rep in range(args.reps):
        quiet.wait(check_load=False)
        watch = OthersWatch().start()
        for r in order:
            gc.collect()
            r.step_s.append(r.step(x))
        busy.append(watch.stop())
        loads.append(os.getloadavg()[0])
        print(f"rep {rep + 1}/{args.reps} (other jobs used {busy[-1]:.0%} of the CPUs during it; load "
              f"{loads[-1]:.2f}): " + "  ".join(f"{r.name} {r.step_s[-1]:.3f} s" for r in runs), flush=True)
        order = order[1:] + order[:1]

    ref = runs[0].losses
    max_rel = max(abs(a - b) / max(abs(b), 1e-12) for r in runs[1:] for a, b in zip(r.losses, ref))
    losses_ok = max_rel <= args.rtol

    rows = []
    for r in runs:
        st = elixir.memory_stats(r.model)
        measured_s = statistics.median(r.step_s)
        row = {
            "plan": r.name, "description": r.description, "chunks": len(r.plan.chunks),
            "cache_blocks": st["cache_blocks"],
            "predicted_s": r.pred.step_s, "measured_s": measured_s, "time_ratio": r.pred.step_s / measured_s,
            "measured_min_s": min(r.step_s), "step_s": r.step_s,
            "predicted_device_bytes": r.pred.model_device_bytes, "measured_device_bytes": st["device_bytes_peak"],
            "memory_ratio": r.pred.model_device_bytes / st["device_bytes_peak"],
            "predicted_host_bytes": r.pred.model_host_bytes, "measured_host_bytes": st["host_bytes_peak"],
            "predicted": {k: v for k, v in r.pred.as_dict().items()},
            "gathers": st["gathers"],
            "plan_json": json.loads(r.plan.to_json()),
        }
        rows.append(row)

    print()
    calibrated = ("cached calibration" if busy_calibrating is None
                  else f"{busy_calibrating:.0%} while calibrating")
    print(f"load average (1 min): {load_before:.2f} before, {min(loads):.2f} to {max(loads):.2f} after the "
          f"repetitions (this process's own threads included); other jobs used {busy_before:.0%} of the CPUs "
          f"before, {calibrated}, {min(busy):.0%} to {max(busy):.0%} during the repetitions (median "
          f"{statistics.median(busy):.0%}); waited {quiet.waited_s:.0f} s for quiet; {os.cpu_count()} CPUs")
    print("| plan | predicted s | measured s (median) | ratio | measured s (best) | predicted MiB | measured MiB "
          "| ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['plan']}: {row['description']} | {row['predicted_s']:.3f} | {row['measured_s']:.3f} | "
              f"{row['time_ratio']:.2f} | {row['measured_min_s']:.3f} | {row['predicted_device_bytes'] / MiB:,.1f} | "
              f"{row['measured_device_bytes'] / MiB:,.1f} | {row['memory_ratio']:.3f} |")
    print()
    print("predicted breakdown (s): " + "; ".join(
        f"{r['plan']}: compute {r['predicted']['compute_s']:.3f}, waiting {r['predicted']['stall_s']:.3f}, "
        f"optimizer {r['predicted']['optim_s']:.3f}" for r in rows))
    print("host model data (MiB), predicted / measured: " + "; ".join(
        f"{r['plan']} {r['predicted_host_bytes'] / MiB:,.1f} / {r['measured_host_bytes'] / MiB:,.1f}" for r in rows))
    time_ok = all(abs(r["time_ratio"] - 1) <= args.time_target for r in rows)
    mem_ok = all(abs(r["memory_ratio"] - 1) <= args.memory_target for r in rows)
    print(f"time within {args.time_target:.0%}: {'yes' if time_ok else 'NO'}; device bytes within "
          f"{args.memory_target:.0%}: {'yes' if mem_ok else 'NO'}; losses agree across plans (largest relative "
          f"difference {max_rel:.1e}): {'yes' if losses_ok else 'NO'}")

    if args.json:
        out = {
            "benchmark": "planner fidelity", "date_utc": date,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                        "torch": torch.__version__},
            "hardware": json.loads(hw.to_json()),
            "config": vars(args) | {"n_params": n_params},
            "load_before": load_before, "load_per_rep": loads, "others_busy_before": busy_before,
            "others_busy_calibrating": busy_calibrating, "others_busy_per_rep": busy, "waited_s": quiet.waited_s,
            "rows": rows,
            "time_ok": time_ok, "memory_ok": mem_ok, "losses_ok": losses_ok,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if losses_ok else 1


if __name__ == "__main__":
    sys.exit(main())
