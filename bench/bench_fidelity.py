"""Planner fidelity: the cost model's predicted step time and model-data device bytes against the runtime.

For each model of --models (default the reference GPT's ~50M preset, fp32, fused AdamW, batch 4 x 256;
`--models hf` adds small Llama, GPT-NeoX, OPT, Qwen2 and Mixtral models built from configs, which the cost
model was not tuned on) and several plans, on one rank or --nproc ranks, the script predicts one step with
`elixir.search.simulate(profile, plan, Hardware.measure())` and measures it: the
median step time over several repetitions after warm-up (plans alternate, in rotating order, as
docs/architecture.md, "How we measure", asks: in its turn a plan runs --turn-warmup untimed steps, which bring its
weights and states back into the CPU's caches as a training run finds them, then --turn-steps timed ones, whose
median is the turn's time; every plan runs in a process of its own, one per rank, as a user's run would, so that
no plan's memory or threads are in another's process) and
`elixir.memory_stats(model)["device_bytes_peak"]`, the runtime's peak of model data over the whole run (nothing is
reset: the cost model predicts the same
counter, activations excluded). Plans:

  resident   every chunk resident, homes on the device (chunk_mib 32)
  ondemand   every chunk gathered on demand into a small cache, homes on the device (3 blocks; chunks of a
             twelfth of the model, at least its largest parameter, unless --ondemand-chunk-mib)
  host       every chunk on demand, parameter and optimizer homes on the host (the same chunks, 4 blocks)
  searched   what `search()` returns when the device may hold ~60% of the all-resident plan's
             predicted device bytes (`Hardware.with_memory(device_bytes=...)`)
  PLAN-again one of them (--repeat, default resident) a second time, in processes of its own, beside the
             others: the same prediction against a second measurement. How far apart the two measurements are
             is how closely this machine lets a step be measured at all (the bench's repeatability, printed
             after the table); its rows are left out of the errors, which count each plan once.

Targets: step time within 10% of the measurement (--time-target), device bytes within 10%. The machine is
shared: the script waits for the 1-minute load average to fall below --max-load and for other jobs to use under
--max-busy of the CPUs before it measures, waits again before every repetition while other jobs are busy
(--max-wait-s of waiting in all), and prints what other jobs used during each repetition (the machine's busy
time less the plans' own processes'). It calibrates `Hardware.measure(refresh=True)` before every repetition and
compares each repetition's steps with the prediction under its own calibration, the ratio being the median of
those (this VM's speed drifts by 15-30% within minutes; --calibrate per-model: once before each model's plans run,
once: at the start only), in a process like the plans' (threads, ranks), on the quiet machine,
again if other jobs took the CPUs meanwhile (--cached-hardware reads the cache instead: every elixir process
on the machine shares it, measured under whatever load there was). Rank 0 of each plan's own process then times
the model's first block against that calibration, as `elixir.plan` does in the training process before it wraps the
model (the other ranks wait), and the plan's prediction uses that compute scale (`Hardware.compute_scale`, see
[Note: one block of the model, timed] in elixir/search/block.py); --block-in calibration times it in the
calibration's process instead, once for all the plans. The search for the "searched" plan uses the scale that the
model's first calibration timed. The table also gives the ratio the rates alone would have (--no-block-timing: the
rates alone).
Every plan computes the same fp32 math from the same weights on the same batch, so the losses of all plans
must agree (checked).

    python bench/bench_fidelity.py                            # 50m, batch 4 x 256, 9 reps
    python bench/bench_fidelity.py --models all --seq-len 128 --json out.json   # as in BENCHMARKS.md
    python bench/bench_fidelity.py --models all --batch-size 4 --seq-len 128 --nproc 2

With --nproc N > 1 every plan runs as N spawned processes that form a gloo group of their own on a free port
(one thread per rank unless --threads says otherwise); the calibration runs as N ranks too. The script waits for
quiet before it starts and between repetitions; a step's time is the slowest rank's, and rank 0's loss and memory
counters are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
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
OVERHEAD_FIELDS = ("op_overhead_s", "interception_op_s", "fetch_overhead_s")  # printed in microseconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="gpt:50m",
                   help=f"models, separated by commas: gpt:PRESET ({', '.join(GPTConfig.preset_names())}), "
                        f"{', '.join(HF_MODELS)}; hf: every Hugging Face one; all: gpt:50m and them")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this machine (gloo)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=9,
                   help="repetitions; each runs --turn-steps steps of every plan. On the 2-core VM of BENCHMARKS.md a "
                        "repetition's ratio spreads by 10-20%% either side, and 5 repetitions left medians outside the "
                        "10%% target that 9 brought inside")
    p.add_argument("--turn-warmup", type=int, default=1,
                   help="alternate schedule: untimed steps a plan runs at the start of its turn, which bring its "
                        "weights and states back into the caches that the other plans' turns took (0: none)")
    p.add_argument("--turn-steps", type=int, default=3,
                   help="alternate schedule: timed steps per plan per turn; the turn's time is their median")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per plan before the first repetition")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads per rank (default: 2 on one rank, 1 with several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resident-chunk-mib", type=float, default=32.0)
    p.add_argument("--ondemand-chunk-mib", type=float, default=None,
                   help="default: a twelfth of the model's fp32 bytes, at least its largest parameter")
    p.add_argument("--ondemand-cache-blocks", type=int, default=3)
    p.add_argument("--host-cache-blocks", type=int, default=4)
    p.add_argument("--repeat", default="resident", choices=("resident", "ondemand", "host", "searched", "none"),
                   help="run this plan a second time, in processes of its own, to measure the bench's own "
                        "repeatability ('none': no second run)")
    p.add_argument("--budget-fraction", type=float, default=0.6,
                   help="device memory for the searched plan, as a fraction of the all-resident plan's "
                        "predicted device bytes (model data and activations)")
    p.add_argument("--cached-hardware", action="store_true",
                   help="use the cached Hardware.measure() instead of calibrating again (refresh=True); "
                        "the cache is shared with every elixir process on the machine, whatever its load was")
    p.add_argument("--schedule", choices=("alternate", "sequential"), default="alternate",
                   help="alternate: the plans take turns of --turn-warmup and --turn-steps steps, one turn each "
                        "per repetition, in rotating order; "
                        "sequential: each plan's warm-up and steps back to back, one plan after the other, as a "
                        "training run takes them (with --calibrate per-rep: a calibration before each plan)")
    p.add_argument("--block-timing", action=argparse.BooleanOptionalAction, default=True,
                   help="time each model's first block with the calibration, as elixir.plan does, and predict with "
                        "its compute scale (the rates-alone ratio is printed beside); with --calibrate once, each "
                        "model still gets a calibration of its own")
    p.add_argument("--block-in", choices=("plan", "calibration"), default="plan",
                   help="where the model's block is timed for a plan's prediction: in rank 0 of the plan's own "
                        "process, right before its steps (as elixir.plan times it in the training process; with "
                        "--calibrate per-rep, again before every repetition), or once per calibration, in the "
                        "calibration's process (the model's first calibration also times it for the search)")
    p.add_argument("--calibrate", choices=("per-rep", "per-model", "once"), default="per-rep",
                   help="calibrate before every repetition (each repetition's steps are then compared with the "
                        "prediction under its own calibration, and the ratio is the median of those: this VM's "
                        "speed drifts by 15-30%% within minutes), right before each model's plans run, or once "
                        "at the start")
    p.add_argument("--max-load", type=float, default=2.0,
                   help="before measuring, wait until the 1-minute load average is below this")
    p.add_argument("--max-busy", type=float, default=0.25,
                   help="before measuring and before every repetition, wait until other jobs use less than this "
                        "share of the CPUs (sampled for 2 s while this process sleeps)")
    p.add_argument("--max-wait-s", type=float, default=600.0,
                   help="waiting for quiet takes at most this long over the whole run; then it measures anyway")
    p.add_argument("--time-target", type=float, default=0.10)
    p.add_argument("--memory-target", type=float, default=0.10)
    p.add_argument("--rtol", type=float, default=1e-5, help="largest relative loss difference between plans")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step: every plan steps on --batch-size rows in this many micro-batches "
                        "(it must divide --batch-size)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "reps", "threads", "nproc", "turn_steps", "grad_accum"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size % args.grad_accum:
        p.error(f"--grad-accum {args.grad_accum} does not divide --batch-size {args.batch_size}: pick a divisor")
    if not 0 < args.budget_fraction < 1:
        p.error("--budget-fraction must be between 0 and 1")
    if args.turn_warmup < 0:
        p.error("--turn-warmup must be at least 0")
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
        self.capacity_s = 1e-9
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
        capacity_s = self.capacity_s = (time.monotonic() - self._wall) * (os.cpu_count() or 1)
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


# Small models of the Hugging Face families, built from configs (nothing is downloaded): the GPT-NeoX one is
# the model of the issue that found the cost model 21-33% off (6 layers, width 256, vocabulary 2048).
HF_MODELS = {
    "llama": ("LlamaConfig", dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=688, vocab_size=2048, max_position_embeddings=1024)),
    "neox": ("GPTNeoXConfig", dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                   intermediate_size=1024, vocab_size=2048, max_position_embeddings=1024)),
    "opt": ("OPTConfig", dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, ffn_dim=1024,
                              word_embed_proj_dim=256, vocab_size=2048, max_position_embeddings=1024,
                              dropout=0.0)),  # OPT's default dropout would make the plans' losses differ
    "qwen2": ("Qwen2Config", dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=688, vocab_size=2048, max_position_embeddings=1024)),
    "mixtral": ("MixtralConfig", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=512, num_local_experts=4,
                                      num_experts_per_tok=2, vocab_size=2048, max_position_embeddings=1024)),
}


def model_list(text: str) -> list[str]:
    """--models: names separated by commas; `hf` is every Hugging Face model, `all` the GPT and them."""
    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        expanded = {"hf": list(HF_MODELS), "all": ["gpt:50m", *HF_MODELS]}.get(name, [name])
        for n in expanded:
            if n not in HF_MODELS and not (n.startswith("gpt:") and n[4:] in GPTConfig.preset_names()):
                presets = ", ".join(GPTConfig.preset_names())
                raise SystemExit(f"--models: unknown model {n!r}; use gpt:PRESET ({presets}), "
                                 f"{', '.join(HF_MODELS)}, hf or all")
            if n not in out:
                out.append(n)
    return out


def build(name: str, seq_len: int, seed: int):
    """(model, vocabulary size) of a --models name, weights from `seed`."""
    torch.manual_seed(seed)
    if name.startswith("gpt:"):
        cfg = GPTConfig.preset(name[4:])
        if seq_len > cfg.block_size:
            raise SystemExit(f"--seq-len {seq_len} exceeds the {name} preset's block_size {cfg.block_size}")
        return GPT(cfg).train(), cfg.vocab_size
    import transformers

    cls_name, kw = HF_MODELS[name]
    cfg = getattr(transformers, cls_name)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).train()
    return model, cfg.vocab_size


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(conn, name: str, seq_len: int, batch_size: int, seed: int, plan_json: str, rank: int, world: int,
            port: int, threads: int, calibrate: bool, block_of: tuple[str, int, int] | None = None,
            time_block: bool = False) -> None:
    """One rank of one plan, in a process of its own (as a user's run would be): builds the model from `seed`,
    wraps it with the plan, then runs a step whenever the parent says so and answers (seconds, loss, own CPU
    seconds of the step, own CPU seconds since the process started: the collection before the step and the
    threads' work after the previous answer included)."""
    try:
        torch.set_num_threads(threads)
        if world > 1:
            import torch.distributed as dist

            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        hw = Hardware.measure(refresh=True) if calibrate else None
        hw_json = hw.to_json() if hw is not None else None
        scale = _compute_scale(hw, *block_of) if hw is not None and block_of is not None and rank == 0 else 1.0
        # the plan's own first block, timed here when the parent asks ("scale"), as elixir.plan times it in the
        # training process (--block-in plan): the model that recorded it stays alive beside the wrapped one
        plan = elixir.Plan.from_json(plan_json)
        micro = batch_size // plan.grad_accum  # the plan's micro-batches: its profile's and its block's rows
        block = _block_inputs(name, seq_len, micro)[0] if time_block and rank == 0 else None
        model, vocab = build(name, seq_len, seed)
        g = torch.Generator().manual_seed(seed + 1 + rank)
        x = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model, optim = elixir.wrap(model, optim, plan=plan)
        conn.send(("ready", hw_json, time.process_time(), scale))
        while True:
            cmd = conn.recv()
            if cmd == "step":
                gc.collect()  # not inside the timed step
                if world > 1:
                    dist.barrier()
                cpu, started = time.process_time(), time.perf_counter()
                loss = 0.0
                for part in x.chunk(plan.grad_accum):
                    part_loss = model(input_ids=part, labels=part).loss / plan.grad_accum
                    part_loss.backward()
                    loss += part_loss.detach()
                optim.step()
                optim.zero_grad()
                seconds = time.perf_counter() - started
                done = time.process_time()
                conn.send((seconds, float(loss.detach()), done - cpu, done))
            elif cmd == "stats":
                conn.send(elixir.memory_stats(model))
            elif isinstance(cmd, tuple) and cmd[0] == "scale":  # ("scale", a calibration's Hardware JSON)
                from elixir.search.block import compute_scale

                # measured on this machine, in a process like this one (threads, ranks), a moment ago
                conn.send(compute_scale(block, dataclasses.replace(Hardware.from_json(cmd[1]), measured_here=True)))
            else:
                break
        if world > 1:
            dist.destroy_process_group()
    except BaseException as e:  # the parent reports it
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _rates(hw: Hardware) -> Hardware:
    return hw.with_compute_scale(1.0)


def _compute_scale(hw: Hardware, name: str, seq_len: int, batch_size: int) -> float:
    """`Hardware.compute_scale` of model `name`, as `elixir.plan` times its first block in the training process
    (see [Note: one block of the model, timed] in elixir/search/block.py)."""
    from elixir.search.block import compute_scale

    block, _ = _block_inputs(name, seq_len, batch_size)
    return compute_scale(block, hw)


def _block_inputs(name: str, seq_len: int, batch_size: int):
    """(BlockInputs of model `name`'s first block, as the profile of a step records them; the model)."""
    from elixir.search.block import BlockInputs

    model, vocab = build(name, seq_len, 0)
    x = torch.randint(0, vocab, (batch_size, seq_len))
    with BlockInputs(model) as block:
        elixir.profile(model, {"input_ids": x, "labels": x})
    return block, model


class Run:
    """One plan: its ranks, each a process of its own, stepping when told."""

    def __init__(self, name: str, description: str, plan: elixir.Plan, model_name: str, args, world: int,
                 calibrate: bool = False, block_of: tuple[str, int, int] | None = None, time_block: bool = False):
        import multiprocessing as mp

        self.name, self.description, self.plan = name, description, plan
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self.cpu_s: list[float] = []
        self.pred = None
        self.compute_scales: list[float] = []  # the block's timings in this plan's process (--block-in plan)
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True, args=(
                child, model_name, args.seq_len, args.batch_size, args.seed, plan.to_json(), rank, world, port,
                args.threads, calibrate and rank == 0 if world == 1 else calibrate, block_of, time_block))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        ready = [self._recv(c) for c in self.conns]
        self.hardware_json = ready[0][1]
        self.compute_scale = ready[0][3]
        self.ready_cpu_s = sum(r[2] for r in ready)  # CPU seconds the ranks took to start (and calibrate)
        self.process_cpu_s = self.ready_cpu_s  # the ranks' CPU seconds since they started, as of the last answer

    def _recv(self, conn):
        answer = conn.recv()
        if isinstance(answer, tuple) and answer and answer[0] == "error":
            self.close()
            raise SystemExit(f"plan {self.name}: a rank failed: {answer[1]}")
        return answer

    def step(self) -> float:
        for c in self.conns:
            c.send("step")
        answers = [self._recv(c) for c in self.conns]
        seconds = max(a[0] for a in answers)  # the step is as long as its slowest rank
        self.losses.append(answers[0][1])
        self.cpu_s.append(sum(a[2] for a in answers))
        self.process_cpu_s = sum(a[3] for a in answers)
        return seconds

    def scale(self, hw: Hardware) -> float:
        """The model's compute scale against `hw`'s rates, its first block timed by rank 0 of this plan's own
        process, now (the other ranks wait, as in `elixir.wrap`'s search on several ranks)."""
        self.conns[0].send(("scale", hw.to_json()))
        return self._recv(self.conns[0])

    def stats(self) -> dict:
        self.conns[0].send("stats")
        return self._recv(self.conns[0])

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send("quit")
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def chunk_sizes(model, resident_mib: float, ondemand_mib: float | None) -> tuple[float, float]:
    """(resident, on-demand) chunk sizes in MiB: --ondemand-chunk-mib, else a twelfth of the model's fp32 bytes,
    at least its largest parameter (so that a small model still has several chunks)."""
    if ondemand_mib is None:
        largest = max(p.numel() for p in model.parameters()) * 4 / MiB
        total = sum(p.numel() for p in model.parameters()) * 4 / MiB
        ondemand_mib = math.ceil(max(largest * 1.01, total / 12) * 100) / 100  # never below the largest
    return resident_mib, ondemand_mib


def measure_model(name: str, args, hw: Hardware, quiet, world: int, say, recalibrate=None) -> list[dict]:
    """The rows of model `name`'s plans; `recalibrate()`, if given, returns a fresh Hardware before every
    repetition, and each repetition's steps are compared with the prediction under it."""
    base, vocab = build(name, args.seq_len, args.seed)
    n_params = sum(p.numel() for p in base.parameters())
    x = torch.randint(0, vocab, (args.batch_size // args.grad_accum, args.seq_len))  # one micro-batch
    prof = elixir.profile(base, {"input_ids": x, "labels": x})
    resident_mib, ondemand_mib = chunk_sizes(base, args.resident_chunk_mib, args.ondemand_chunk_mib)

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    plans: list[tuple[str, str, elixir.Plan]] = []
    uniform = [
        ("resident", f"all resident, homes on device ({resident_mib:g} MiB chunks)",
         dict(chunk_mib=resident_mib, resident=True)),
        ("ondemand", f"on demand, homes on device ({ondemand_mib:g} MiB, {args.ondemand_cache_blocks} blocks)",
         dict(chunk_mib=ondemand_mib, cache_blocks=args.ondemand_cache_blocks, resident=False)),
        ("host", f"on demand, homes on host ({ondemand_mib:g} MiB, {args.host_cache_blocks} blocks)",
         dict(chunk_mib=ondemand_mib, cache_blocks=args.host_cache_blocks, resident=False,
              param_home="host", optim_home="host")),
    ]
    for plan_name, description, kw in uniform:
        plans.append((plan_name, description, elixir.Plan.uniform(
            base, optimizer=adamw(base), world_size=world, grad_accum=args.grad_accum, **kw)))
    resident_pred = simulate(prof, plans[0][2], hw)
    budget = int(args.budget_fraction * resident_pred.device_bytes_peak)
    try:
        searched, _ = search(prof, hw.with_memory(device_bytes=budget), world_size=world)
    except PlanDoesNotFitError as e:  # a small model: activations alone take most of the budget
        say(f"{name}: searched: no plan under a {budget / MiB:.1f} MiB device budget, left out: {e}")
    else:
        searched = dataclasses.replace(searched, use_order=tuple(prof.use_sequence()), grad_accum=args.grad_accum)
        plans.append(("searched", f"search() under a {budget / MiB:.1f} MiB device budget "
                                  f"({args.budget_fraction:.0%} of all-resident)", searched))
    del base
    if args.repeat != "none":
        again = [(f"{n}-again", f"{d}; the {n} plan again, in processes of its own", p) for n, d, p in plans
                 if n == args.repeat]
        if not again:
            say(f"{name}: no {args.repeat} plan to run again (--repeat)")
        plans += again

    own_block = args.block_timing and args.block_in == "plan"

    def with_scale(r: Run, rep_hw: Hardware) -> Hardware:
        """`rep_hw`, with the model's compute scale timed in the plan's own process now (--block-in plan)."""
        if not own_block:
            return rep_hw
        r.compute_scales.append(r.scale(rep_hw))
        return rep_hw.with_compute_scale(r.compute_scales[-1])

    runs: list[Run] = []
    try:
        for plan_name, description, plan in plans:
            run = Run(plan_name, description, plan, name, args, world, time_block=own_block)
            run.pred, run.pred_rates = simulate(prof, plan, with_scale(run, hw)), simulate(prof, plan, _rates(hw))
            runs.append(run)
        say(f"model {name} ({n_params / 1e6:.1f}M params, {len(prof.ops)} operators in the step), batch "
            f"{args.batch_size} x {args.seq_len} per rank in {args.grad_accum} micro-batch(es), {world} rank(s), fp32, "
            f"AdamW(fused), {args.threads} thread(s) per rank, every plan in processes of its own")
        for r in runs:
            say(f"  {r.name}: {r.description}; {len(r.plan.chunks)} chunks")
        busy: list[float] = []
        preds_by_rep: list[list[float]] = []  # --calibrate per-rep: each plan's prediction before each rep
        rates_by_rep: list[list[float]] = []  # the same from the rates alone (compute scale 1)
        if args.schedule == "sequential":  # each plan's steps back to back, as one training run takes them
            for r in runs:
                if recalibrate is not None:
                    rep_hw = recalibrate()
                    r.pred = simulate(prof, r.plan, with_scale(r, rep_hw))
                    r.pred_rates = simulate(prof, r.plan, _rates(rep_hw))
                for _ in range(args.warmup):
                    r.step()
                quiet.wait(check_load=False)
                watch, plan_cpu_s = OthersWatch().start(), r.process_cpu_s
                for _ in range(args.reps):
                    r.step_s.append(r.step())
                others = watch.stop()
                plan_cpu_s = r.process_cpu_s - plan_cpu_s
                outside = (plan_cpu_s - sum(r.cpu_s[-args.reps:])) / watch.capacity_s
                busy.append(max(0.0, others - plan_cpu_s / watch.capacity_s))
                say(f"  {r.name} (other jobs {busy[-1]:.0%} of the CPUs, the plan outside its timed steps "
                    f"{outside:.0%}, load {os.getloadavg()[0]:.2f}): " + " ".join(f"{t:.3f}" for t in r.step_s)
                    + " s")
        else:
            for r in runs:
                for _ in range(args.warmup):
                    r.step()
        order = list(runs)
        for rep in range(args.reps if args.schedule == "alternate" else 0):
            if recalibrate is not None:
                rep_hw = recalibrate()
                preds_by_rep.append([simulate(prof, r.plan, with_scale(r, rep_hw)).step_s for r in runs])
                rates_by_rep.append([simulate(prof, r.plan, _rates(rep_hw)).step_s for r in runs])
            quiet.wait(check_load=False)
            watch, plan_cpu_s = OthersWatch().start(), sum(r.process_cpu_s for r in runs)
            for r in order:
                for _ in range(args.turn_warmup):
                    r.step()
                r.step_s.append(statistics.median(r.step() for _ in range(args.turn_steps)))
            others = watch.stop()
            # the plans' own processes are not "other jobs", before and after their timed steps included
            plan_cpu_s = sum(r.process_cpu_s for r in runs) - plan_cpu_s
            turn = args.turn_warmup + args.turn_steps
            outside = (plan_cpu_s - sum(sum(r.cpu_s[-turn:]) for r in runs)) / watch.capacity_s
            busy.append(max(0.0, others - plan_cpu_s / watch.capacity_s))
            say(f"  rep {rep + 1}/{args.reps} (other jobs {busy[-1]:.0%} of the CPUs, the plans outside their "
                f"timed steps {outside:.0%}, load {os.getloadavg()[0]:.2f}): "
                + "  ".join(f"{r.name} {r.step_s[-1]:.3f} s" + (f" (block {r.compute_scales[-1]:.2f}x)" if own_block
                                                                   else "") for r in runs))
            order = order[1:] + order[:1]
        ref = runs[0].losses
        max_rel = max((abs(a - b) / max(abs(b), 1e-12) for r in runs[1:] for a, b in zip(r.losses, ref)),
                      default=0.0)
        rows = []
        for i, r in enumerate(runs):
            st = r.stats()
            measured_s = statistics.median(r.step_s)
            if preds_by_rep:
                predicted = [p[i] for p in preds_by_rep]
                predicted_s = statistics.median(predicted)
                time_ratio = statistics.median(p / m for p, m in zip(predicted, r.step_s))
                rates_ratio = statistics.median(p[i] / m for p, m in zip(rates_by_rep, r.step_s))
            else:
                predicted, predicted_s, time_ratio = [], r.pred.step_s, r.pred.step_s / measured_s
                rates_ratio = r.pred_rates.step_s / measured_s
            rows.append({
                "model": name, "params": n_params, "ops": len(prof.ops), "ranks": world,
                "plan": r.name, "description": r.description, "chunks": len(r.plan.chunks),
                "repeat_of": r.name.removesuffix("-again") if r.name.endswith("-again") else None,
                "cache_blocks": st["cache_blocks"],
                "predicted_s": predicted_s, "measured_s": measured_s, "time_ratio": time_ratio,
                "rates_time_ratio": rates_ratio,
                "compute_scale": statistics.median(r.compute_scales) if r.compute_scales else hw.compute_scale,
                "compute_scales": r.compute_scales,
                "predicted_s_per_rep": predicted,
                "measured_min_s": min(r.step_s), "step_s": r.step_s,
                "predicted_device_bytes": r.pred.model_device_bytes, "measured_device_bytes": st["device_bytes_peak"],
                "memory_ratio": r.pred.model_device_bytes / st["device_bytes_peak"],
                "predicted_host_bytes": r.pred.model_host_bytes, "measured_host_bytes": st["host_bytes_peak"],
                "predicted": dict(r.pred.as_dict()),
                "gathers": st["gathers"],
                "losses_max_rel_diff": max_rel,
                "others_busy_per_rep": busy,
                "plan_json": json.loads(r.plan.to_json()),
            })
    finally:
        for r in runs:
            r.close()
    return rows


def repeatability(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(model, plan) -> the median over the repetitions of the repeated plan's step over the first run's, turn by
    turn (the two took their turns in the same repetition, seconds apart)."""
    first = {(r["model"], r["plan"]): r for r in rows if r["repeat_of"] is None}
    out = {}
    for r in rows:
        if r["repeat_of"] is not None:
            one = first[(r["model"], r["repeat_of"])]
            out[(r["model"], r["repeat_of"])] = statistics.median(b / a for a, b in zip(one["step_s"], r["step_s"]))
    return out


def against_resident(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(model, plan) -> the plan's predicted-over-measured ratio over its model's resident plan's: how the cost model
    prices one plan against another of the same model, which is what the search compares (a model's compute
    scale, its share of one calibration's drift, and whatever else all its plans share cancel out)."""
    resident = {r["model"]: r["time_ratio"] for r in rows if r["repeat_of"] is None and r["plan"] == "resident"}
    return {(r["model"], r["plan"]): r["time_ratio"] / resident[r["model"]] for r in rows
            if r["repeat_of"] is None and r["plan"] != "resident" and r["model"] in resident}


def calibrate(args, world: int, model: str, block: bool = True) -> tuple[Hardware, float]:
    """Hardware.measure(refresh=True) in processes like the plans' (threads, ranks), while the machine is quiet,
    with `model`'s compute scale as rank 0 of a training process times it (--block-timing, unless not `block`)."""
    small = argparse.Namespace(**{**vars(args), "seq_len": 16, "batch_size": 1})
    plan = elixir.Plan.uniform(build("gpt:tiny", small.seq_len, args.seed)[0], world_size=world)
    block_of = (model, args.seq_len, args.batch_size // args.grad_accum) if args.block_timing and block else None
    run = Run("calibration", "", plan, "gpt:tiny", small, world, calibrate=True, block_of=block_of)
    run.close()
    return Hardware.from_json(run.hardware_json).with_compute_scale(run.compute_scale), run.ready_cpu_s


def main(argv=None) -> int:
    args = parse_args(argv)
    models = model_list(args.models)
    world = args.nproc
    args.threads = args.threads if args.threads is not None else (2 if world == 1 else 1)

    def say(text: str) -> None:
        print(text, flush=True)

    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    quiet = Quiet(args.max_load, args.max_busy, args.max_wait_s)
    busy_before = quiet.wait(check_load=True)
    load_before = os.getloadavg()[0]
    def calibrated(model: str, block: bool) -> tuple[Hardware, float | None]:
        if args.cached_hardware:
            hw, busy_calibrating = Hardware.measure(), None
            if args.block_timing and block:
                hw = hw.with_compute_scale(_compute_scale(hw, model, args.seq_len, args.batch_size // args.grad_accum))
        else:
            while True:  # calibrate now, while the machine is quiet; again if other jobs took the CPUs meanwhile
                watch = OthersWatch().start()
                hw, own_cpu_s = calibrate(args, world, model, block)
                busy_calibrating = max(0.0, watch.stop() - own_cpu_s / watch.capacity_s)
                if busy_calibrating < args.max_busy or quiet.waited_s >= quiet.budget:
                    break
                say(f"other jobs used {busy_calibrating:.0%} of the CPUs while calibrating: again")
                quiet.wait(check_load=False)
        by_size = sorted(hw.matmul_by_size.get("float32", {}).items())
        say(f"hardware: {hw.name}: matmul fp32 {hw.matmul_flops['float32'] / 1e9:.0f} GFLOP/s"
            + "".join(f", {r / 1e9:.0f} at {f / 1e6:.0f} MFLOP" for f, r in by_size) + ", copy "
            f"{hw.device_copy_bytes_per_s / 1e9:.1f} GB/s, memory-bound operators "
            + ", ".join(f"{r / 1e9:.1f} GB/s at {b / 1e6:.1f} MB" for b, r in sorted(hw.eager_rates.items()))
            + f", AdamW {hw.device_optim_elems_per_s / 1e9:.2f} G elements/s"
            + "".join(f", {k} {getattr(hw, k) * 1e6:.2f} us" for k in OVERHEAD_FIELDS if hasattr(hw, k))
            + (f"; {model}'s block at {hw.compute_scale:.2f}x the rates' prediction" if block and args.block_timing
               else ""))
        return hw, busy_calibrating

    rows: list[dict] = []
    calibrations: list[dict] = []
    hw = None
    def calibration(before: str, model: str, block: bool = True) -> Hardware:
        hw, busy_calibrating = calibrated(model, block)
        calibrations.append({"before": before, "hardware": json.loads(hw.to_json()),
                             "compute_scale": hw.compute_scale, "others_busy_calibrating": busy_calibrating})
        return hw

    for name in models:
        if hw is None or args.calibrate != "once" or args.block_timing:
            hw = calibration(name, name)
        recalibrate = None
        if args.calibrate == "per-rep":
            reps = iter(range(1, args.reps + 1))
            recalibrate = lambda name=name, reps=reps: calibration(  # noqa: E731
                f"{name} rep {next(reps)}", name, block=args.block_in == "calibration")
        rows += measure_model(name, args, hw, quiet, world, say, recalibrate)

    say("")
    say(f"load average (1 min) {load_before:.2f} before; {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"{world} rank(s) x {args.threads} thread(s); other jobs {busy_before:.0%} before; waited "
        f"{quiet.waited_s:.0f} s for quiet")
    say("| model | plan | predicted s | measured s (median) | ratio | ratio, rates alone | predicted MiB | "
        "measured MiB | ratio |")
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        say(f"| {row['model']} | {row['plan']} | {row['predicted_s']:.3f} | {row['measured_s']:.3f} | "
            f"{row['time_ratio']:.2f} | {row['rates_time_ratio']:.2f} | {row['predicted_device_bytes'] / MiB:,.1f} | "
            f"{row['measured_device_bytes'] / MiB:,.1f} | {row['memory_ratio']:.3f} |")
    repeats = [r for r in rows if r["repeat_of"] is not None]
    rows_once = [r for r in rows if r["repeat_of"] is None]  # each plan once: the errors below
    errors = [abs(r["time_ratio"] - 1) for r in rows_once]
    worst = max(rows_once, key=lambda r: abs(r["time_ratio"] - 1))
    rates_errors = [abs(r["rates_time_ratio"] - 1) for r in rows_once]
    say(f"from the rates alone (every compute scale 1): median error {statistics.median(rates_errors):.1%}, worst "
        f"{max(rates_errors):.1%}")
    within = f"{sum(e <= args.time_target for e in errors)} of {len(errors)} within {args.time_target:.0%}"
    say(f"step time: median error {statistics.median(errors):.1%}, worst {abs(worst['time_ratio'] - 1):.1%} "
        f"({worst['model']} {worst['plan']}), {within}; device bytes: worst "
        f"{max(abs(r['memory_ratio'] - 1) for r in rows):.1%}")
    relative = against_resident(rows)
    if relative:
        (worst_m, worst_p), worst_r = max(relative.items(), key=lambda kv: abs(kv[1] - 1))
        say(f"against the resident plan of the same model (ratio over its ratio): median "
            f"{statistics.median(abs(a - 1) for a in relative.values()):.1%} off, worst {abs(worst_r - 1):.1%} "
            f"({worst_m} {worst_p}), {sum(abs(a - 1) <= args.time_target for a in relative.values())} of "
            f"{len(relative)} within {args.time_target:.0%}")
    apart = repeatability(rows)
    if repeats:
        say("the same plan measured twice (repeatability; median over the repetitions of the second process's "
            "step over the first's): " + ", ".join(f"{m} {p} {a:.2f}" for (m, p), a in apart.items())
            + f"; median {statistics.median(abs(a - 1) for a in apart.values()):.1%} apart, worst "
            f"{max(abs(a - 1) for a in apart.values()):.1%}")
    time_ok = all(e <= args.time_target for e in errors)
    mem_ok = all(abs(r["memory_ratio"] - 1) <= args.memory_target for r in rows)
    max_rel = max(r["losses_max_rel_diff"] for r in rows)
    losses_ok = max_rel <= args.rtol
    say(f"time within {args.time_target:.0%}: {'yes' if time_ok else 'NO'}; device bytes within "
        f"{args.memory_target:.0%}: {'yes' if mem_ok else 'NO'}; losses agree across plans (largest relative "
        f"difference {max_rel:.1e}): {'yes' if losses_ok else 'NO'}")

    if args.json:
        out = {
            "benchmark": "planner fidelity", "date_utc": date,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                        "ranks": world, "torch": torch.__version__},
            "calibrations": calibrations,
            "config": vars(args),
            "load_before": load_before, "others_busy_before": busy_before, "waited_s": quiet.waited_s,
            "rows": rows,
            "median_time_error": statistics.median(errors), "worst_time_error": abs(worst["time_ratio"] - 1),
            "repeatability": [{"model": m, "plan": p, "second_over_first": a} for (m, p), a in apart.items()],
            "against_resident": [{"model": m, "plan": p, "ratio_over_resident": a} for (m, p), a in relative.items()],
            "time_ok": time_ok, "memory_ok": mem_ok, "losses_ok": losses_ok,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        say(f"wrote {args.json}")
    return 0 if losses_ok else 1


if __name__ == "__main__":
    sys.exit(main())
