"""Many ranks on CPU: Elixir vs FSDP2 vs DeepSpeed ZeRO-3, side by side in the same torchrun processes.

Every system trains the same GPT (identical initial weights: deep copies of one model built from one
seed on every rank) in fp32 with the same AdamW hyper-parameters (lr 1e-4, betas 0.9/0.999, eps 1e-8,
weight decay 0.01) on the same global batch of random byte tokens, split by rows over the ranks.
Two settings:

  no offload   elixir-resident   Elixir, every chunk kept gathered (ZeRO-2-like), homes on device
               elixir-ondemand   Elixir, chunks gathered on demand into --cache-blocks blocks (ZeRO-3-like)
               fsdp2             fully_shard(block) per block of model.h, then fully_shard(model);
                                 torch.optim.AdamW(fused=True)
               deepspeed         ZeRO stage 3, fp32; client optimizer torch.optim.AdamW(fused=True)
                                 when DeepSpeed accepts it, else its own "AdamW" type (printed)
  offload      elixir-offload    Elixir resident, optim_home="host" (fp32 master + AdamW states + update on host)
               fsdp2-offload     as fsdp2 with CPUOffloadPolicy(pin_memory=False) on every fully_shard
               deepspeed-offload ZeRO-3 with "offload_optimizer": {"device": "cpu"} (DeepSpeedCPUAdam)
  floor        local             plain PyTorch, every rank steps alone on its own rows: no communication, so
                                 not one model; what the compute alone costs with both ranks on the machine.
                                 Printed as each system's throughput over the floor's.

On a CPU-only machine "device" and "host" are the same memory, so the offload setting measures the
bookkeeping and copies each system adds for offloading, not a bandwidth trade.

Every system is built once (all share the default gloo process group), runs --warmup untimed steps,
then the systems alternate: every repetition times --steps steps of each system in turn (the order
rotates between repetitions), with a barrier before and after and the maximum elapsed time over the
ranks; tokens/s = global tokens / that time. Reported per system: the median tokens/s, and the ratios
Elixir / FSDP2 and Elixir / DeepSpeed within the same setting, computed per repetition and then the
median (robust to the machine's load drifting between repetitions).

The losses (mean over the ranks) of every system over the first --check-steps steps are compared to
the first system's; fp32 on the same data should agree to ~1e-4 relative. A larger difference is
printed as a WARNING (DeepSpeed may differ a little), the benchmark does not fail on it. A system
that cannot be built or run (e.g. DeepSpeed missing) is reported with the reason and left out.

    GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/bench_dist.py
    # the run in BENCHMARKS.md (~10.8M params, ~7 minutes on 2 cores, profiles included):
    GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/bench_dist.py \\
        --model small --n-layer 6 --n-embd 384 --n-head 6 --batch-size 8 --seq-len 256 --steps 2 --reps 21 \\
        --profile elixir-resident,elixir-ondemand,elixir-offload,fsdp2,fsdp2-offload,deepspeed,deepspeed-offload \\
        --profile-steps 5 --json dist.json
    ... bench/bench_dist.py --systems elixir-resident,fsdp2 --profile elixir-resident,fsdp2

--profile runs, after the benchmark, --profile-steps more steps of each listed system under cProfile
on rank 0, step by step in turn, and prints each system's self time per step by category (compute,
collective waits and launches, optimizer math, copies, the rest) and its top functions.

DeepSpeed settings that would otherwise make the comparison unequal: "gradient_clipping": 0.0
(DeepSpeed 0.19 clips to norm 1.0 by default; the other systems do not clip), and its ZeRO-3
replacement of torch.nn.functional.linear, which it installs process-wide and never removes, is
switched on only around DeepSpeed's own steps, so that the other systems run torch's own linear.

Each rank runs one torch thread (torch.set_num_threads(1), --threads). DeepSpeed's CPU Adam is
compiled on first use (~60 s, cached under ~/.cache/torch_extensions); DS_ACCELERATOR=cpu is set here.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone

import torch
import torch.distributed as dist

import elixir
from elixir import bench as B
from elixir.bench import LR, NO_OFFLOAD, OFFLOAD, TORCH_LINEAR, WEIGHT_DECAY, adamw, plain_step
from elixir.models import GPT, GPTConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported (in build_deepspeed)
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

SYSTEMS = {
    # name: (setting, family, description)
    "elixir-resident": (NO_OFFLOAD, "elixir", "Elixir, chunks resident (ZeRO-2-like), homes on device"),
    "elixir-ondemand": (NO_OFFLOAD, "elixir", "Elixir, chunks on demand (ZeRO-3-like), homes on device"),
    "fsdp2": (NO_OFFLOAD, "fsdp2", "FSDP2 fully_shard per block + root"),
    "deepspeed": (NO_OFFLOAD, "deepspeed", "DeepSpeed ZeRO-3"),
    "elixir-offload": (OFFLOAD, "elixir", "Elixir resident, optim_home=host"),
    "fsdp2-offload": (OFFLOAD, "fsdp2", "FSDP2 + CPUOffloadPolicy(pin_memory=False)"),
    "deepspeed-offload": (OFFLOAD, "deepspeed", "DeepSpeed ZeRO-3 + offload_optimizer cpu (DeepSpeedCPUAdam)"),
    # not a training system: what the same compute costs with no communication at all
    "local": (NO_OFFLOAD, "floor", "floor: plain PyTorch, each rank steps alone on its rows (no communication)"),
}
# LR, BETAS, EPS, WEIGHT_DECAY, adamw, plain_step, TORCH_LINEAR and the FSDP2 and DeepSpeed builders are
# elixir.bench's, shared with `elixir bench`: DeepSpeed ZeRO-3 replaces torch.nn.functional.linear
# process-wide and leaves it so; its builder confines the override to DeepSpeed's own steps.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="small", help=f"GPT preset ({', '.join(GPTConfig.preset_names())})")
    p.add_argument("--n-layer", type=int, help="override the preset's n_layer")
    p.add_argument("--n-embd", type=int, help="override the preset's n_embd")
    p.add_argument("--n-head", type=int, help="override the preset's n_head")
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step (split over the ranks)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps per system per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions (each runs every system once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system before the first rep")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of systems to run")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batch")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on every rank")
    p.add_argument("--chunk-mib", type=float, default=8.0, help="Elixir chunk size")
    p.add_argument("--cache-blocks", type=int, default=4, help="cache blocks of elixir-ondemand")
    p.add_argument("--prefetch-depth", type=int, default=2, help="Elixir prefetch depth")
    p.add_argument("--check-steps", type=int, default=5, help="first steps whose losses are compared")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative loss difference beyond which to warn")
    p.add_argument("--timeout", type=float, default=600.0, help="process group timeout (s)")
    p.add_argument("--profile", metavar="SYSTEMS", default="",
                   help="comma list: after the benchmark, cProfile these systems on rank 0, step by step in turn")
    p.add_argument("--profile-steps", type=int, default=5, help="steps of each system run under --profile")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (rank 0)")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown or not args.systems:
        p.error(f"--systems: unknown {unknown}; known: {', '.join(SYSTEMS)}")
    args.profile = [s.strip() for s in args.profile.split(",") if s.strip()]
    if not set(args.profile) <= set(args.systems):
        p.error(f"--profile {','.join(args.profile)}: profile only systems that --systems runs")
    for name in ("batch_size", "seq_len", "steps", "reps", "threads", "cache_blocks", "check_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def log(*a) -> None:
    if dist.get_rank() == 0:
        print(*a, flush=True)


class System:
    """One trainable system: how it steps, its losses and timings so far."""

    def __init__(self, name: str, model, optim, step_fn, note: str = ""):
        self.name = name
        self.setting, self.family, self.description = SYSTEMS[name]
        self.model, self.optim, self._step = model, optim, step_fn
        self.note = note
        self.losses: list[torch.Tensor] = []
        self.seconds: list[float] = []
        self.tokens_per_s: list[float] = []

    def step(self, x: torch.Tensor) -> None:
        self.losses.append(self._step(x).detach())


# --- builders (FSDP2 and DeepSpeed as `elixir bench` builds them: elixir/bench/peers.py) ------------

def build_elixir(name, base, args):
    m = copy.deepcopy(base).train()
    opt = adamw(m.parameters())
    kw = {
        "elixir-resident": dict(resident=True, param_home="device", optim_home="device"),
        "elixir-ondemand": dict(resident=False, param_home="device", optim_home="device"),
        "elixir-offload": dict(resident=True, param_home="device", optim_home="host"),
    }[name]
    plan = elixir.Plan.uniform(
        m, chunk_mib=args.chunk_mib, cache_blocks=args.cache_blocks, prefetch_depth=args.prefetch_depth,
        compute_dtype=torch.float32, optimizer=opt, **kw,
    )
    m, opt = elixir.wrap(m, opt, plan=plan)
    note = f"{len(plan.chunks)} chunks of {args.chunk_mib:g} MiB" + (
        "" if kw["resident"] else f", {args.cache_blocks} cache blocks")
    return System(name, m, opt, plain_step(m, opt), note)


def build_fsdp2(name, base, args):
    s = B.build_fsdp2(base, "cpu", torch.float32, offload=name == "fsdp2-offload")
    return System(name, s.model, s.optim, s.step_fn, s.note)


def build_deepspeed(name, base, args, local_batch):
    s = B.build_deepspeed(base, "cpu", torch.float32, offload=name == "deepspeed-offload", local_batch=local_batch,
                          log=log)
    return System(name, s.model, s.optim, s.step_fn, s.note)


# --- main ----------------------------------------------------------------------------------------

def max_over_ranks(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_ok(ok: bool) -> bool:
    t = torch.tensor([0 if ok else 1])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) == 0


PROFILE_CATEGORIES = (
    # (category, predicate on the function's name as pstats writes builtins: "<built-in method X>", "<method 'X' ...>")
    ("autograd engine self time (backward kernels run from C++)", lambda f: "run_backward" in f),
    ("compute ops called from Python (forward; DeepSpeed's linear also in backward)", lambda f: any(k in f for k in (
        "_nn.linear", "'matmul'", "scaled_dot_product_attention", "_nn.gelu", "layer_norm", "embedding",
        "cross_entropy", "dropout", "'sum'", "'t' of"))),
    ("collective waits", lambda f: "_distributed_c10d.wait" in f or "method 'wait'" in f),
    ("collective launches", lambda f: "_distributed_c10d." in f and "wait" not in f),
    ("optimizer math", lambda f: "adamw" in f.lower() or "adam_update" in f or "ds_adam" in f),
    ("copies / cat / split", lambda f: any(k in f for k in ("'copy_'", "_foreach_copy_", "torch.cat", "_chunk_cat",
                                                            "split_with_sizes_copy", "'to' of"))),
)


def profile_summary(prof: cProfile.Profile, steps: int) -> dict[str, float]:
    """ms per step of self time in each category; the rest is Python bookkeeping and small ops."""
    st = pstats.Stats(prof)
    out = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    total = 0.0
    for (file, _line, func), (_, _, tt, _, _) in st.stats.items():
        total += tt
        for name, pred in PROFILE_CATEGORIES:
            if file == "~" and pred(func):
                out[name] += tt
                break
    out["other (Python bookkeeping, small ops)"] = total - sum(out.values())
    out["total"] = total
    return {k: v / steps * 1e3 for k, v in out.items()}


def run_profiles(systems: list[System], x: torch.Tensor, steps: int) -> dict[str, str]:
    """cProfile each system on rank 0, interleaved step by step so that the load of the machine
    drifts over all of them alike; returns each system's report (rank 0) or {}."""
    profs = {s.name: cProfile.Profile() for s in systems} if dist.get_rank() == 0 else {}
    wall = {s.name: 0.0 for s in systems}
    for _ in range(steps):
        for s in systems:
            dist.barrier()
            start = time.perf_counter()
            if profs:
                profs[s.name].enable()
            s.step(x)
            if profs:
                profs[s.name].disable()
            wall[s.name] += time.perf_counter() - start
    dist.barrier()
    reports = {}
    if profs:
        sums = {name: profile_summary(prof, steps) for name, prof in profs.items()}
        cats = list(next(iter(sums.values())))
        table = io.StringIO()
        table.write(f"\nrank 0 self time per step (ms) by category, cProfile, {steps} steps each, interleaved\n\n")
        table.write("| category | " + " | ".join(sums) + " |\n|---|" + "---:|" * len(sums) + "\n")
        for c in cats:
            table.write(f"| {c} | " + " | ".join(f"{sums[n][c]:.0f}" for n in sums) + " |\n")
        reports["summary"] = table.getvalue()
    for name, prof in profs.items():
        out = io.StringIO()
        out.write(f"cProfile of {name} on rank 0, {steps} steps interleaved with {', '.join(profs)}: "
                  f"{wall[name]:.3f} s wall ({wall[name] / steps * 1e3:.1f} ms/step, profiler overhead included)\n")
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(40)
        reports[name] = out.getvalue()
    return reports


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    group = elixir.init_distributed(timeout_s=args.timeout)
    if not dist.is_initialized():
        raise SystemExit("run me under torchrun, e.g. torchrun --nproc-per-node 2 bench/bench_dist.py")
    rank, world = group.rank, group.size
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    local_batch = args.batch_size // world
    t_begin = time.perf_counter()

    overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd),
                                    ("n_head", args.n_head)) if v is not None}
    cfg = GPTConfig.preset(args.model, **overrides)
    if args.seq_len > cfg.block_size:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds block_size {cfg.block_size}")
    torch.manual_seed(args.seed)
    base = GPT(cfg)
    n_params = base.num_params()
    g = torch.Generator().manual_seed(args.seed + 1)
    x_global = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
    x = x_global.chunk(world)[rank].contiguous()
    tokens_per_step = args.batch_size * args.seq_len

    import importlib.metadata as md
    try:
        ds_version = md.version("deepspeed")
    except md.PackageNotFoundError:
        ds_version = None
    log(f"model {args.model} {overrides or ''} ({n_params / 1e6:.2f}M params), global batch "
        f"{args.batch_size} x seq {args.seq_len} ({local_batch} rows per rank), {world} ranks (gloo), "
        f"fp32, AdamW(lr={LR}, wd={WEIGHT_DECAY}), {args.threads} thread(s)/rank, torch {torch.__version__}, "
        f"deepspeed {ds_version}")

    systems: list[System] = []
    skipped: dict[str, str] = {}
    for name in args.systems:
        family = SYSTEMS[name][1]
        t0 = time.perf_counter()
        err = None
        try:
            if family == "elixir":
                s = build_elixir(name, base, args)
            elif family == "fsdp2":
                s = build_fsdp2(name, base, args)
            elif family == "floor":
                m = copy.deepcopy(base).train()
                opt = adamw(m.parameters())
                s = System(name, m, opt, plain_step(m, opt), "each rank trains its own copy: not one model")
            else:
                s = build_deepspeed(name, base, args, local_batch)
            for _ in range(args.warmup):
                s.step(x)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
            torch.nn.functional.linear = TORCH_LINEAR
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if rank == 0:
                traceback.print_exc()
        # every rank must agree on whether the system runs, or the collectives would hang
        if not all_ok(err is None):
            skipped[name] = err or "failed on another rank"
            log(f"[{name}] CANNOT RUN: {skipped[name]}")
            gc.collect()
            continue
        systems.append(s)
        log(f"[{name}] built + {args.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s; {s.note}")
    del base
    if not systems:
        log("no system could run")
        return 1

    order = list(systems)
    for rep in range(args.reps):
        for s in order:
            gc.collect()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                s.step(x)
            elapsed = time.perf_counter() - start
            dist.barrier()
            elapsed = max_over_ranks(elapsed)
            s.seconds.append(elapsed)
            s.tokens_per_s.append(args.steps * tokens_per_step / elapsed)
        log(f"rep {rep + 1}/{args.reps} tokens/s: " + "  ".join(f"{s.name} {s.tokens_per_s[-1]:.0f}" for s in systems))
        order = order[1:] + order[:1]
    bench_s = time.perf_counter() - t_begin

    # --- losses: mean over the ranks of each step's local loss -----------------------------------
    losses = {}
    for s in systems:
        t = torch.stack([v.float() for v in s.losses]).double()
        dist.all_reduce(t)
        losses[s.name] = (t / world).tolist()
    trained = [s for s in systems if s.family != "floor"]  # the floor trains no one model: its losses differ
    ref_name = (trained or systems)[0].name
    ref = losses[ref_name]
    k = min(args.check_steps, len(ref))
    rel = {s.name: max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[s.name][:k], ref[:k]))
           for s in trained}
    rel_all = {s.name: max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[s.name], ref)) for s in trained}

    # --- ratios per setting ----------------------------------------------------------------------
    by_name = {s.name: s for s in systems}
    ratios = {}
    for s in systems:
        if s.family != "elixir":
            continue
        for other in systems:
            if other.family == "elixir" or other.setting != s.setting:
                continue
            per_rep = [a / b for a, b in zip(s.tokens_per_s, other.tokens_per_s)]
            ratios[f"{s.name}/{other.name}"] = {
                "per_rep": per_rep, "median": statistics.median(per_rep),
                "min": min(per_rep), "max": max(per_rep),
            }

    results = []
    for s in systems:
        row = {
            "system": s.name, "setting": s.setting, "description": s.description, "note": s.note,
            "tokens_per_s": s.tokens_per_s, "seconds": s.seconds,
            "median_tokens_per_s": statistics.median(s.tokens_per_s),
            "median_ms_per_step": statistics.median(s.seconds) / args.steps * 1e3,
            "max_rel_loss_diff_first_steps": rel.get(s.name), "max_rel_loss_diff_all_steps": rel_all.get(s.name),
        }
        if s.family == "elixir":
            st = elixir.memory_stats(s.model)
            row.update({k2: st[k2] for k2 in ("device_bytes_peak", "host_bytes_peak") if k2 in st})
        results.append(row)

    if rank == 0:
        print()
        print(f"| setting | system | median tokens/s | ms/step | vs FSDP2 (median, min-max over {args.reps} reps) "
              "| vs DeepSpeed (median, min-max) | loss rel. diff (first steps) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in results:
            cells = []
            for fam in ("fsdp2", "deepspeed"):
                other = fam + ("-offload" if r["setting"] == OFFLOAD else "")
                q = ratios.get(f"{r['system']}/{other}")
                cells.append("-" if q is None else f"{q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})")
            diff = r["max_rel_loss_diff_first_steps"]
            print(f"| {r['setting']} | {r['system']}: {r['description']} | {r['median_tokens_per_s']:,.0f} | "
                  f"{r['median_ms_per_step']:.0f} | {cells[0]} | {cells[1]} | "
                  f"{'-' if diff is None else f'{diff:.1e}'} |")
        for n, why in skipped.items():
            print(f"| {SYSTEMS[n][0]} | {n}: {SYSTEMS[n][2]} | CANNOT RUN: {why} | | | | |")
        print()
        for s in systems:
            if s.note:
                print(f"  {s.name}: {s.note}")
        print(f"losses over the first {k} steps (mean over ranks) vs {ref_name}: "
              + ", ".join(f"{n} {v:.1e}" for n, v in rel.items() if n != ref_name)
              + f"; over all {len(ref)} steps: "
              + ", ".join(f"{n} {v:.1e}" for n, v in rel_all.items() if n != ref_name))
        bad = {n: v for n, v in rel.items() if v > args.rtol}
        if bad:
            print(f"WARNING: losses differ beyond {args.rtol:g} relative over the first {k} steps: "
                  + ", ".join(f"{n} {v:.1e}" for n, v in bad.items()))
        floor = next((s for s in systems if s.family == "floor"), None)
        if floor is not None:  # how close each system comes to the compute alone, per repetition
            print("throughput / the no-communication floor (median over reps): " + ", ".join(
                f"{s.name} {statistics.median(a / b for a, b in zip(s.tokens_per_s, floor.tokens_per_s)):.3f}"
                for s in trained))
        print(f"first loss {ref[0]:.6f}, loss after {len(ref)} steps {ref[-1]:.6f} ({ref_name}); "
              f"wall time {bench_s:.0f} s")

    profiles = {}
    if args.profile:
        profiles = run_profiles([by_name[n] for n in args.profile if n in by_name], x, args.profile_steps)
        for text in profiles.values():
            print(text)

    if args.json and rank == 0:
        out = {
            "benchmark": "many ranks on CPU: Elixir vs FSDP2 vs DeepSpeed ZeRO-3",
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "threads_per_rank": args.threads, "world_size": world,
                        "torch": torch.__version__, "deepspeed": ds_version},
            "config": {k2: v for k2, v in vars(args).items()} | {
                "n_params": n_params, "tokens_per_step": tokens_per_step, "gpt_config": vars(cfg)},
            "results": results, "ratios": ratios, "skipped": skipped, "losses": losses,
            "loss_reference": ref_name, "profiles": profiles, "wall_s": bench_s,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
