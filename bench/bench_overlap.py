"""The optimizer step inside backward on the CPU: overlap on, overlap off, and no optimizer at all.

One process, `torch.set_num_threads(1)`: the compute (forward, backward, Elixir's fetches and gradient
reductions) runs on the main thread, one core; with `Plan.overlap=True` the host AdamW of each chunk runs
on the optimizer's worker thread (see [Note: the step inside backward] in elixir/optim/overlap.py), which
can use the second core. The model and batch are chosen so that the host AdamW is expensive next to the
compute: the script measures it on a plain PyTorch copy (`torch.optim.AdamW(fused=True)`, `opt.step()`
alone, against forward + backward alone) and prints the ratio; the target is at least 1/3.

Three configurations of one Elixir plan (fp32 compute, every chunk with its parameter shard on the
"device" and its fp32 master and AdamW states on the host, so that every chunk is updated inside
backward), wrapped once each from deep copies of one model:

  on      Plan.overlap=True: forward, backward (each chunk's update on the worker as soon as its gradient
          is reduced), step (waits for the worker, writes the masters back into the shards), zero_grad
  off     the same plan with overlap=False: forward, backward, step (every update, on the main thread,
          then the write-back), zero_grad
  limit   the overlap-off plan, wrapped a third time: forward, backward, zero_grad and never a step. It
          includes everything but the optimizer: the chunk fetches, the gradients copied into the chunks'
          buffers, reduced and copied to the host master's gradient, and zero_grad freeing them; it
          excludes the updates and the write-back of the masters. (Not the overlap-on model without a
          step: there zero_grad undoes the updates that backward already ran.)

Plain PyTorch on another copy runs in the same rotation (its forward + backward and its `opt.step()`
timed apart), which gives the AdamW-to-compute ratio under the same load as the measurement. After
--warmup untimed steps of each, every repetition runs --steps steps of each system in turn, the order
rotating; step k of every system uses batch k. Before each repetition the script waits (--max-wait-s in
all) until other jobs use under --max-busy of the CPUs, and it records what they used during each one:
the overlap needs a free core, so the results are also given apart for the quiet and the busy repetitions.

Reported: ms/step, median (min-max) over repetitions, with the forward, backward and step calls apart;
ratios on/off and on/limit (the median over repetitions of the ratio within each); the share of the
optimizer's cost that the overlap hid, (off - on) / (off - limit). Where the time goes, from the kernel's
own accounting of each thread (/proc/<tid>/schedstat, getrusage): the main thread's time in forward +
backward on a CPU, waiting for a CPU (runnable: the cores are taken), and asleep (blocked: the GIL, or a
staging buffer, whose wait is timed by wrapping the runtime's `take_staging` on the instance); its minor
page faults; the worker's CPU time and its wait for a CPU. Next to the measurement, the cost model's
prediction (`elixir.search.cost.simulate` on `elixir.profile` of the model and batch) for the plan with and
without overlap, with the cached `Hardware.measure()` calibration and with one made in this process (one
thread, on a quiet machine if it gets one, not written to the cache).

Checked (exit status 1 otherwise): on and off give bit-identical parameters, AdamW states and losses after
the same steps on the same data (the design's promise when the speculation holds), and `elixir.step_stats`
of on reports a speculated update in every step and no rollback (nothing clips here).

    python bench/bench_overlap.py                          # 50m preset, batch 1 x 8, 21 reps
    python bench/bench_overlap.py --reps 31 --max-wait-s 600 --json out.json   # as in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from datetime import datetime, timezone

import torch

import elixir
from elixir.bench import adamw, build_model, make_batch, num_params
from elixir.hardware import Hardware
from elixir.search.cost import simulate

CONFIGS = ("on", "off", "limit")
DESCRIPTIONS = {
    "on": "overlap on, the updates on the worker during backward",
    "off": "overlap off, the updates after backward on the main thread",
    "limit": "the overlap-off plan without step (no update, no write-back)",
    "pytorch": "plain PyTorch (the reference for the AdamW/compute ratio)",
}
PHASES = ("forward", "backward", "step", "zero_grad")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="50m", help="GPT preset or bench model (elixir.bench.model_names)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=8,
                   help="tokens per sequence; few tokens make the host AdamW large next to the compute")
    p.add_argument("--chunk-mib", type=float, default=8.0, help="chunk size (must hold the largest parameter)")
    p.add_argument("--resident", action="store_true",
                   help="every chunk resident (gathered for the whole step) instead of fetched on demand")
    p.add_argument("--cache-blocks", type=int, default=4, help="cache blocks for on-demand chunks")
    p.add_argument("--prefetch-depth", type=int, default=2)
    p.add_argument("--reps", type=int, default=21, help="repetitions; each runs --steps steps of every system")
    p.add_argument("--steps", type=int, default=1, help="timed steps per system per repetition")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system before the first repetition")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the compute thread)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights; batch k uses seed + 1 + k")
    p.add_argument("--min-ratio", type=float, default=1 / 3,
                   help="the AdamW-to-compute ratio the model is meant to reach (reported, not enforced)")
    p.add_argument("--max-busy", type=float, default=0.25,
                   help="before each repetition, wait until other jobs use less than this share of the CPUs")
    p.add_argument("--max-wait-s", type=float, default=180.0,
                   help="waiting for quiet takes at most this long over the whole run; then it measures anyway")
    p.add_argument("--no-calibrate", action="store_true",
                   help="predict with the cached Hardware.measure() only (skip the calibration in this process)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "reps", "steps", "threads", "cache_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step allocates the optimizer states)")
    return args


# --- what the machine does ----------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int] | None:
    """(all, idle) jiffies of the machine's CPUs since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values), values[3] + values[4]


class OthersWatch:
    """Share of all CPUs that other processes used between `start()` and `stop()`: the machine's busy time
    less this process's own CPU time (None where /proc/stat cannot be read)."""

    def start(self) -> OthersWatch:
        self._jiffies, self._own, self._wall = _cpu_jiffies(), time.process_time(), time.monotonic()
        return self

    def stop(self) -> float | None:
        now = _cpu_jiffies()
        if self._jiffies is None or now is None:
            return None
        busy_s = ((now[0] - self._jiffies[0]) - (now[1] - self._jiffies[1])) / os.sysconf("SC_CLK_TCK")
        own_s = time.process_time() - self._own
        capacity_s = (time.monotonic() - self._wall) * (os.cpu_count() or 1)
        return min(1.0, max(0.0, (busy_s - own_s) / max(capacity_s, 1e-9)))


def others_busy(seconds: float = 1.0) -> float | None:
    """Share of all CPUs other jobs use over `seconds` while this process sleeps."""
    watch = OthersWatch().start()
    time.sleep(seconds)
    return watch.stop()


class Quiet:
    """Waits, before each repetition, until other jobs use less than `max_busy` of the CPUs, at most
    `max_wait_s` over the whole run (then it measures anyway, and says so)."""

    def __init__(self, max_busy: float, max_wait_s: float):
        self.max_busy, self.budget, self.waited_s = max_busy, max_wait_s, 0.0

    def wait(self) -> None:
        while self.waited_s < self.budget:
            t = time.monotonic()
            busy = others_busy()
            if busy is None or busy < self.max_busy:
                return
            time.sleep(2.0)
            self.waited_s += time.monotonic() - t


def thread_sched_s(native_id: int | None) -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a CPU) of a thread of this process so far, from the
    scheduler's own accounting (Linux /proc/<tid>/schedstat, nanoseconds); (0, 0) where unknown."""
    if native_id is None:
        return 0.0, 0.0
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            cpu_ns, wait_ns = (int(v) for v in f.read().split()[:2])
    except (OSError, ValueError):
        return 0.0, 0.0
    return cpu_ns / 1e9, wait_ns / 1e9


def optimizer_worker_ids() -> list[int]:
    """Native ids of the overlap's optimizer worker threads (named in elixir/optim/overlap.py)."""
    return [t.native_id for t in threading.enumerate() if t.name.startswith("elixir-optimizer")]


def usable_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- the systems --------------------------------------------------------------------------------------


METRICS = (
    "total", *PHASES,
    "fb_cpu", "fb_runq", "fb_asleep", "fb_faults", "main_cpu", "main_runq", "main_faults", "worker_cpu", "worker_runq",
    "staging_wait", "gathers",
)
"""What each system records per repetition (seconds per step, gathers per step). total: wall time of the
whole step; forward, backward, step, zero_grad: wall time of each call; fb_*: the main thread during forward +
backward, from the scheduler: on a CPU (cpu), runnable but waiting for one (runq), asleep (asleep: the wall time
less both, i.e. blocked: on the GIL, or on a staging buffer); main_* and worker_*: the whole step, main thread
and optimizer worker; staging_wait: time the main thread spent in `take_staging` (waiting for the worker to
give a gradient staging buffer back; overlap on only); *_faults: the main thread's minor page faults (first
touches of freshly allocated memory), a count per step."""


class System:
    """One model and optimizer, its training step timed phase by phase."""

    def __init__(self, name: str, model, optim, *, steps: bool, plan=None):
        self.name, self.model, self.optim, self.steps, self.plan = name, model, optim, steps, plan
        self.losses: list[torch.Tensor] = []
        self.m: dict[str, list[float]] = {k: [] for k in METRICS}  # per repetition, per step
        self.staging_wait_s = 0.0
        if plan is not None and plan.overlap:
            self._time_staging()

    def _time_staging(self) -> None:
        """Count the time backward waits for a staging buffer: the runtime's `take_staging` of this model,
        timed by a wrapper on the instance (the library is unchanged)."""
        grads = elixir.runtime_of(self.model).grads
        take = grads.take_staging

        def timed_take_staging():
            t = time.perf_counter()
            try:
                return take()
            finally:
                self.staging_wait_s += time.perf_counter() - t

        grads.take_staging = timed_take_staging

    def step(self, x: torch.Tensor, acc: dict[str, float] | None = None, worker: int | None = None) -> None:
        me = threading.get_native_id()
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        c0, q0 = thread_sched_s(me)
        w0 = thread_sched_s(worker)
        sw0 = self.staging_wait_s
        t0 = time.perf_counter()
        loss = self.model(input_ids=x, labels=x).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        c2, q2 = thread_sched_s(me)
        f2 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        if self.steps:
            self.optim.step()
        t3 = time.perf_counter()
        self.optim.zero_grad()
        t4 = time.perf_counter()
        c4, q4 = thread_sched_s(me)
        f4 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        w4 = thread_sched_s(worker)
        self.losses.append(loss.detach())
        if acc is None:
            return
        for k, v in (("total", t4 - t0), ("forward", t1 - t0), ("backward", t2 - t1), ("step", t3 - t2),
                     ("zero_grad", t4 - t3), ("fb_cpu", c2 - c0), ("fb_runq", q2 - q0),
                     ("fb_asleep", (t2 - t0) - (c2 - c0) - (q2 - q0)), ("main_cpu", c4 - c0),
                     ("main_runq", q4 - q0), ("fb_faults", f2 - f0), ("main_faults", f4 - f0),
                     ("worker_cpu", w4[0] - w0[0]), ("worker_runq", w4[1] - w0[1]),
                     ("staging_wait", self.staging_wait_s - sw0)):
            acc[k] += v

    def gathers_now(self) -> int:
        return elixir.memory_stats(self.model)["gathers"] if self.plan is not None else 0

    def median(self, key: str) -> float:
        return statistics.median(self.m[key])


def build(args, base: torch.nn.Module) -> tuple[dict[str, System], dict[str, elixir.Plan]]:
    systems: dict[str, System] = {}
    plans: dict[str, elixir.Plan] = {}
    for name in CONFIGS:
        model = copy.deepcopy(base)
        optim = adamw(model.parameters())
        plan = elixir.Plan.uniform(
            model, chunk_mib=args.chunk_mib, cache_blocks=args.cache_blocks, resident=args.resident,
            param_home="device", optim_home="host", compute_dtype=torch.float32,
            prefetch_depth=args.prefetch_depth, optimizer=optim, overlap=name == "on",
        )
        model, optim = elixir.wrap(model, optim, plan=plan)
        systems[name] = System(name, model, optim, steps=name != "limit", plan=plan)
        plans[name] = plan
    ref = copy.deepcopy(base)
    systems["pytorch"] = System("pytorch", ref, adamw(ref.parameters()), steps=True)
    return systems, plans


# --- the checks ---------------------------------------------------------------------------------------


def identical(a: System, b: System) -> tuple[bool, str]:
    """Whether two wrapped systems hold bit-identical parameters, AdamW states and losses."""
    pa, pb = elixir.full_state_dict(a.model), elixir.full_state_dict(b.model)
    for name, t in pa.items():
        if not torch.equal(t, pb[name]):
            diff = (t - pb[name]).abs().max().item()
            return False, f"parameter {name} differs (largest difference {diff:.3g})"
    sa, sb = a.optim.state_dict()["state"], b.optim.state_dict()["state"]
    if sa.keys() != sb.keys():
        return False, "the optimizers hold state for different chunks"
    for key, st in sa.items():
        for field_name, v in st.items():
            if torch.is_tensor(v) and not torch.equal(v, sb[key][field_name]):
                return False, f"AdamW state {field_name} of chunk {key} differs"
    for k, (la, lb) in enumerate(zip(a.losses, b.losses)):
        if not torch.equal(la, lb):
            return False, f"loss of step {k} differs ({la.item()!r} vs {lb.item()!r})"
    return True, f"{len(pa)} parameters, {len(sa)} chunks' AdamW states and {len(a.losses)} losses equal"


# --- the prediction -----------------------------------------------------------------------------------


def predict(prof, plans: dict[str, elixir.Plan], hw: Hardware) -> dict:
    """The cost model's step for the plan with and without overlap, and the no-optimizer limit (the
    overlap-off step less its optimizer after backward)."""
    on, off = simulate(prof, plans["on"], hw), simulate(prof, plans["off"], hw)
    return {
        "on_s": on.step_s, "off_s": off.step_s, "limit_s": off.step_s - off.optim_s,
        "on": on.as_dict(), "off": off.as_dict(),
    }


# --- report -------------------------------------------------------------------------------------------


def compare(on: System, off: System, lim: System, reps) -> dict:
    """Medians of the three configurations over the repetitions `reps`, the ratios within a repetition (their
    medians), and the share of the optimizer's cost hidden, (off - on) / (off - limit), from the medians and
    as the median over repetitions. Also `hidden_of_step`: 1 - (on - limit) / (off's step call), the share of
    the optimizer's own cost (the step call after backward without overlap) that does not show in on's step:
    off - limit also counts whatever else off's backward costs more than limit's (its page faults vary)."""
    reps = list(reps)
    t = {n: [s.m["total"][r] for r in reps] for n, s in (("on", on), ("off", off), ("limit", lim))}
    med = {n: statistics.median(v) for n, v in t.items()}
    off_step = statistics.median(off.m["step"][r] for r in reps)
    nan = float("nan")
    return {
        "off_step_s": off_step, "hidden_of_step": 1 - (med["on"] - med["limit"]) / off_step,
        "reps": len(reps), "on_s": med["on"], "off_s": med["off"], "limit_s": med["limit"],
        "on_over_off": statistics.median(a / b for a, b in zip(t["on"], t["off"])),
        "on_over_limit": statistics.median(a / b for a, b in zip(t["on"], t["limit"])),
        "hidden": (med["off"] - med["on"]) / (med["off"] - med["limit"]) if med["off"] > med["limit"] else nan,
        "hidden_per_rep_median": statistics.median(  # repetitions where off took longer than limit
            [(b - a) / (b - c) for a, b, c in zip(t["on"], t["off"], t["limit"]) if b > c] or [nan]),
    }



def ms(s: float) -> str:
    return f"{s * 1e3:,.0f}"


def spread(values: list[float]) -> str:
    return f"{ms(statistics.median(values))} ({ms(min(values))}-{ms(max(values))})"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    date = datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    load_before = os.getloadavg()
    commit = git_commit()
    started = time.perf_counter()

    base = build_model(args.model, seed=args.seed)
    n_params = num_params(base)
    vocab = base.config.vocab_size
    n_batches = args.warmup + args.reps * args.steps
    batches = [make_batch(args.batch_size, args.seq_len, vocab, seed=args.seed + 1 + k) for k in range(n_batches)]

    prof = elixir.profile(base, {"input_ids": batches[0], "labels": batches[0]})
    systems, plans = build(args, base)
    del base
    gc.collect()

    hw_cached = Hardware.measure()
    predictions = {"cached": predict(prof, plans, hw_cached)}
    hw_here = None
    quiet = Quiet(args.max_busy, args.max_wait_s)
    if not args.no_calibrate:
        quiet.wait()
        with warnings.catch_warnings():  # "busy machine, not cached": it is never cached here anyway
            warnings.simplefilter("ignore")
            hw_here = Hardware.measure(cache=False)
        predictions["here"] = predict(prof, plans, hw_here)

    plan = plans["on"]
    print(f"date {date}; commit {commit}; torch {torch.__version__}; Python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs ({len(usable_cpus())} usable by this process); "
          f"torch.set_num_threads({args.threads}); load average before "
          f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    print(f"model {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch_size} x {args.seq_len}, fp32, "
          f"AdamW(fused=True); plan: {len(plan.chunks)} chunks of {args.chunk_mib:g} MiB, "
          + ("all resident" if args.resident else f"on demand through {args.cache_blocks} cache blocks")
          + ", parameter shards on the device, masters and AdamW states on the host")

    names = list(systems)
    order = list(names)
    for k in range(args.warmup):
        for n in names:
            systems[n].step(batches[k])
    workers = optimizer_worker_ids()
    worker = workers[0] if len(workers) == 1 else None

    busy: list[float | None] = []
    loads: list[float] = []
    for rep in range(args.reps):
        quiet.wait()
        watch = OthersWatch().start()
        for n in order:
            s = systems[n]
            gc.collect()
            acc = dict.fromkeys(METRICS, 0.0)
            gathers0 = s.gathers_now()
            for j in range(args.steps):
                s.step(batches[args.warmup + rep * args.steps + j], acc, worker if n == "on" else None)
            acc["gathers"] = s.gathers_now() - gathers0
            for k in METRICS:
                s.m[k].append(acc[k] / args.steps)
        busy.append(watch.stop())
        loads.append(os.getloadavg()[0])
        print(f"rep {rep + 1}/{args.reps} (load {loads[-1]:.2f}"
              + ("" if busy[-1] is None else f", other jobs {busy[-1]:.0%} of the CPUs") + "): "
              + "  ".join(f"{n} {ms(systems[n].m['total'][-1])}" for n in names) + " ms", flush=True)
        order = order[1:] + order[:1]
    load_after = os.getloadavg()

    on, off, lim, pt = (systems[n] for n in ("on", "off", "limit", "pytorch"))
    ok, why = identical(on, off)
    stats = elixir.step_stats(on.model)
    total_steps = args.warmup + args.reps * args.steps
    stats_ok = stats["rollbacks"] == 0 and stats["speculated_steps"] == total_steps
    pt_compute = [f + b for f, b in zip(pt.m["forward"], pt.m["backward"])]
    adam_ratios = [a / c for a, c in zip(pt.m["step"], pt_compute)]
    adam_ratio = statistics.median(adam_ratios)
    everything = compare(on, off, lim, range(args.reps))
    ratio_on_off, ratio_on_lim, hidden, hidden_per_rep, hidden_of_step = (
        everything[k] for k in ("on_over_off", "on_over_limit", "hidden", "hidden_per_rep_median", "hidden_of_step"))
    quiet_reps = [r for r, b in enumerate(busy) if b is not None and b < args.max_busy]
    busy_reps = [r for r in range(args.reps) if r not in quiet_reps]
    strata = {"quiet": compare(on, off, lim, quiet_reps) if quiet_reps else None,
              "busy": compare(on, off, lim, busy_reps) if busy_reps else None}

    print()
    print(f"plain PyTorch: forward+backward {spread(pt_compute)} ms, AdamW step alone {spread(pt.m['step'])} ms: "
          f"AdamW / (forward+backward) = {adam_ratio:.2f} (median over repetitions; target >= {args.min_ratio:.2f}: "
          f"{'holds' if adam_ratio >= args.min_ratio else 'does NOT hold'})")
    print()
    labels = {"cached": "cached calibration", "here": "calibrated in this process"}
    print("| configuration | ms/step, median (min-max) | forward | backward | step | predicted ms ("
          + " / ".join(labels[k] for k in predictions) + ") |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in CONFIGS:
        s = systems[n]
        pred = " / ".join(ms(p[f"{n}_s"]) for p in predictions.values())
        print(f"| {n}: {DESCRIPTIONS[n]} | {spread(s.m['total'])} | {ms(s.median('forward'))} | "
              f"{ms(s.median('backward'))} | {ms(s.median('step'))} | {pred} |")
    print()
    print(f"on/off {ratio_on_off:.3f}, on/limit {ratio_on_lim:.3f} (medians of the ratios within a repetition); "
          f"share of the optimizer's cost hidden, (off - on) / (off - limit): {hidden:.2f} from the medians "
          f"({hidden_per_rep:.2f}: median over repetitions); 1 - (on - limit) / (off's step call): "
          f"{hidden_of_step:.2f}")
    if quiet_reps and busy_reps:
        for label, q in strata.items():
            used = "under" if label == "quiet" else "at least"
            print(f"the {q['reps']} repetitions during which other jobs used {used} {args.max_busy:.0%} of the CPUs: "
                  f"on {ms(q['on_s'])}, off {ms(q['off_s'])}, limit "
                  f"{ms(q['limit_s'])} ms (medians); on/off {q['on_over_off']:.3f}, "
                  f"on/limit {q['on_over_limit']:.3f}, hidden {q['hidden']:.2f} ({q['hidden_per_rep_median']:.2f}; "
                  f"of the step call {q['hidden_of_step']:.2f})")
    for label, p in predictions.items():
        po, pf = p["on"], p["off"]
        hid = (p["off_s"] - p["on_s"]) / (p["off_s"] - p["limit_s"]) if p["off_s"] > p["limit_s"] else float("nan")
        print(f"predicted ({labels[label]}): on/off {p['on_s'] / p['off_s']:.3f}, on/limit "
              f"{p['on_s'] / p['limit_s']:.3f}, hidden {hid:.2f}; off: updates and write-back after backward "
              f"{ms(pf['optim_s'])} ms; on: updates inside backward {ms(po['optim_in_backward_s'])} ms, after "
              f"backward {ms(po['optim_s'])} ms, backward waiting for a staging buffer {ms(po['optim_wait_s'])} ms")
    for label, hw in (("cached", hw_cached), ("here", hw_here)):
        if hw is not None:
            print(f"{labels[label]}: matmul fp32 {hw.matmul_flops['float32'] / 1e9:.0f} GFLOP/s, host AdamW "
                  f"{hw.host_optim_elems_per_s / 1e9:.2f} G elements/s, "
                  f"copy {hw.device_copy_bytes_per_s / 1e9:.1f} GB/s")
    print()
    print("where the time goes (ms per step, medians; main thread during forward + backward, then the whole step):")
    print("| configuration | fwd+bwd wall | on CPU | waiting for a CPU | asleep | of which for a staging buffer "
          "| page faults | main thread CPU, step | page faults, step | worker CPU | worker waiting for a CPU "
          "| gathers/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in CONFIGS:
        s = systems[n]
        fb = statistics.median(f + b for f, b in zip(s.m["forward"], s.m["backward"]))
        print(f"| {n} | {ms(fb)} | {ms(s.median('fb_cpu'))} | {ms(s.median('fb_runq'))} | "
              f"{ms(s.median('fb_asleep'))} | {ms(s.median('staging_wait')) if n == 'on' else '-'} | "
              f"{s.median('fb_faults'):,.0f} | {ms(s.median('main_cpu'))} | {s.median('main_faults'):,.0f} | "
              f"{ms(s.median('worker_cpu')) if n == 'on' else '-'} | "
              f"{ms(s.median('worker_runq')) if n == 'on' else '-'} | {s.median('gathers'):.0f} |")
    print()
    print(f"elixir.step_stats(on): {stats}")
    print(f"on and off bit-identical: {'yes' if ok else 'NO'} ({why}); speculated every step without rollback: "
          f"{'yes' if stats_ok else 'NO'}")
    known = [b for b in busy if b is not None]
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min; {min(loads):.2f} to "
          f"{max(loads):.2f} after each repetition, this process included)"
          + (f"; other jobs used {min(known):.0%} to {max(known):.0%} of the CPUs during the repetitions (median "
             f"{statistics.median(known):.0%})" if known else "")
          + f"; waited {quiet.waited_s:.0f} s for them to use under {args.max_busy:.0%}"
          + f"; {time.perf_counter() - started:.0f} s in all")

    if args.json:
        out = {
            "benchmark": "optimizer inside backward (overlap) on the CPU", "date_utc": date, "commit": commit,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "usable_cpus": sorted(usable_cpus()), "threads": args.threads,
                        "torch": torch.__version__, "python": platform.python_version()},
            "config": vars(args) | {"n_params": n_params, "chunks": len(plan.chunks)},
            "load_before": load_before, "load_after": load_after, "load_per_rep": loads, "others_busy_per_rep": busy,
            "waited_for_quiet_s": quiet.waited_s,
            "adamw_over_forward_backward": adam_ratio, "adamw_ratio_per_rep": adam_ratios,
            "systems": {n: {"description": DESCRIPTIONS[n], "median_s": s.median("total"), "per_rep_s": s.m}
                        for n, s in systems.items()},
            "on_over_off": ratio_on_off, "on_over_limit": ratio_on_lim, "hidden": hidden,
            "hidden_per_rep_median": hidden_per_rep, "hidden_of_step": hidden_of_step, "quiet_reps": quiet_reps,
            "quiet": strata["quiet"], "busy": strata["busy"],
            "predicted": predictions,
            "hardware": {"cached": json.loads(hw_cached.to_json()),
                         "here": json.loads(hw_here.to_json()) if hw_here is not None else None},
            "step_stats_on": stats, "bit_identical": ok, "bit_identical_detail": why, "speculation_ok": stats_ok,
            "plan": json.loads(plan.to_json()),
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if ok and stats_ok else 1


if __name__ == "__main__":
    sys.exit(main())
