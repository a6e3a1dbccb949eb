"""Benchmark Elixir side by side with plain PyTorch, FSDP2 and DeepSpeed ZeRO-3 on this machine.

`elixir bench` trains the same model (identical initial weights), on the same batch of random tokens, in
the same dtype, with the same `torch.optim.AdamW(fused=True)`, under every system:

  no offload  pytorch            plain PyTorch (one rank only, and only where the model fits)
              fsdp2              FSDP2: fully_shard per block, then the root
              deepspeed          DeepSpeed ZeRO-3 (when `import deepspeed` works)
              elixir             Elixir with the plan elixir.plan searches for this machine (Hardware.measure())
  offload     fsdp2-offload      FSDP2 + CPUOffloadPolicy (pinned memory on CUDA only)
              deepspeed-offload  DeepSpeed ZeRO-3 + offload_optimizer to the CPU
              elixir-offload     the same plan with every optimizer (fp32 master, states, update) on the host

After --warmup steps each, the systems alternate: every repetition runs --steps steps of each in turn, the
order rotating. It prints a table of median tokens/s, TFLOPS per rank (6 x params x tokens / time), peak
device and host memory and the ratios to Elixir (per repetition, then the median), Elixir's predicted
step time next to the measured one, and the losses' agreement. `--nproc N` runs N ranks on this machine
(it re-launches itself under torch.distributed.run).

    elixir bench                              # one process, the 10.8M GPT "gpt-10m", 8 x 256 tokens
    elixir bench --nproc 2 --json bench.json  # two ranks (gloo on CPU, NCCL on GPUs)
    elixir bench --model opt-125m --dtype bf16 --systems elixir,fsdp2 --seq-len 512
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import partial

import torch
import torch.distributed as dist

DEFAULT_MODEL = "gpt-10m"
DEFAULT_SEQ_LEN = 256


def _int_at_least(minimum: int, flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use {flag} N with N >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; use {flag} N with N >= {minimum}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from elixir.bench import DEFAULT_SYSTEMS

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="gpt-10m, a GPT preset (tiny, small, 50m, gpt2) or a family preset (opt-125m, gpt2-medium, "
                   f"llama-2-7b, ...) (default: {DEFAULT_MODEL}, 10.8M parameters)")
    for field in ("n-layer", "n-embd", "n-head"):
        p.add_argument(f"--{field}", type=_int_at_least(1, f"--{field}"), metavar="N",
                       help=f"override the GPT preset's {field.replace('-', '_')}")
    p.add_argument("--batch-size", type=_int_at_least(1, "--batch-size"), metavar="N", default=8,
                   help="sequences per step over all ranks (default: 8)")
    p.add_argument("--seq-len", type=_int_at_least(2, "--seq-len"), metavar="N", default=None,
                   help=f"tokens per sequence (default: {DEFAULT_SEQ_LEN}, or the model's longest if shorter)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="compute dtype of every system (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--systems", default="all", metavar="LIST",
                   help=f"comma list of systems, or 'all' ({','.join(DEFAULT_SYSTEMS)}; pytorch only with one rank)")
    p.add_argument("--reps", type=_int_at_least(1, "--reps"), metavar="N", default=7,
                   help="repetitions; each runs every system once (default: 7)")
    p.add_argument("--steps", type=_int_at_least(1, "--steps"), metavar="N", default=2,
                   help="timed steps per system per repetition (default: 2)")
    p.add_argument("--warmup", type=_int_at_least(0, "--warmup"), metavar="N", default=2,
                   help="untimed steps per system before the first repetition (default: 2)")
    p.add_argument("--nproc", type=_int_at_least(1, "--nproc"), metavar="N", default=1,
                   help="ranks on this machine; N > 1 re-launches under torch.distributed.run (default: 1)")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the weights and the batch (default: 0)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=600.0,
                   help="how long a collective waits for the other ranks (default: 600)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every bad value ends in parser.error (one line, exit status 2) before anything is built."""
    from elixir.bench import DEFAULT_SYSTEMS, SYSTEMS, model_limits

    overrides = {k: v for k in ("n_layer", "n_embd", "n_head") if (v := getattr(args, k)) is not None}
    try:
        longest, _ = model_limits(args.model, **overrides)
    except ValueError as e:
        parser.error(f"--model {args.model}: {e}")
    args.overrides = overrides
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, longest)
    if args.seq_len > longest:
        parser.error(f"--seq-len {args.seq_len} exceeds the {longest} positions of --model {args.model}; "
                     f"use --seq-len {longest} or less")
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} does not divide over {world} ranks; use a multiple of {world}")
    if args.systems.strip() == "all":
        args.system_list = [s for s in DEFAULT_SYSTEMS if not (s == "pytorch" and world > 1)]
    else:
        args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in args.system_list if s not in DEFAULT_SYSTEMS]
        if unknown or not args.system_list:
            parser.error(f"--systems {args.systems!r}: unknown {', '.join(unknown) or 'empty list'}; "
                         f"known: {', '.join(DEFAULT_SYSTEMS)}, or all")
        if "pytorch" in args.system_list and world > 1:
            parser.error(f"--systems pytorch runs in one process only; drop it or use --nproc 1 (not {world})")
        if len(set(args.system_list)) != len(args.system_list):
            parser.error(f"--systems {args.systems!r} names a system twice")
    assert all(s in SYSTEMS for s in args.system_list)
    if not args.timeout > 0:
        parser.error(f"--timeout {args.timeout} must be above 0 seconds")
    if args.nproc > 1 and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc} exceeds the {torch.cuda.device_count()} GPUs of this machine")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json}: the folder {folder} does not exist")


def _argv(args: argparse.Namespace) -> list[str]:
    """The flags of `args` as a command line, for the ranks that --nproc launches. Not --nproc itself: the
    ranks know their world size, and torch.distributed.run would take it for its own --nproc-per-node."""
    out = ["--model", args.model, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--dtype", args.dtype, "--systems", ",".join(args.system_list), "--reps", str(args.reps),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--timeout", str(args.timeout)]
    for k, v in args.overrides.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    if args.json:
        out += ["--json", os.path.abspath(args.json)]
    return out


def _launch(args: argparse.Namespace) -> int:
    """Run `elixir bench` on --nproc ranks under torch.distributed.run; its exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "elixir", "bench", *_argv(args)]
    print("launching: " + " ".join(f"{k}={env[k]}" for k in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS") if k in env)
          + (" " if "OMP_NUM_THREADS" in env else "") + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, env=env).returncode


def _fits_alone(n_params: int, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether plain PyTorch's parameters, gradients and AdamW states (16 bytes a parameter; 20 with the bf16
    compute copy) take at most 80% of the free memory, leaving the rest to activations."""
    need = n_params * (16 if dtype == torch.float32 else 20)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = 0
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return True, ""
    if need <= 0.8 * free:
        return True, ""
    return False, f"needs about {need / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free for model data alone"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check(args, parser)
    under_launcher = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    if args.nproc > 1 and not under_launcher:
        return _launch(args)
    return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    import elixir
    from elixir import accel, comm
    from elixir import bench as B
    from elixir.hardware import Hardware

    started = time.perf_counter()
    elixir.init_distributed(timeout_s=args.timeout)
    rank, world = comm.rank_and_world()
    device = accel.default_device()
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    log = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    progress = B.Progress()
    names = list(args.system_list)
    skipped: dict[str, str] = {}

    if any(n.startswith("deepspeed") for n in names) and not B.deepspeed_available():
        log(B.DEEPSPEED_MISSING)
        for n in [n for n in names if n.startswith("deepspeed")]:
            skipped[n] = "DeepSpeed not installed"
            names.remove(n)
    leave = lambda: None  # noqa: E731
    if world == 1 and any(n.startswith(("fsdp2", "deepspeed")) for n in names):
        leave = B.single_process_group(device, args.timeout)  # FSDP2 and DeepSpeed need a process group
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before any system's memory is counted
    meters = B.meters_for(device)
    hardware = Hardware.measure() if any(n.startswith("elixir") for n in names) else None

    n_params = B.num_params(B.build_model(args.model, device="meta", **args.overrides))
    # the systems copy this model; on a GPU it starts on the host when it would crowd the device
    home = device
    if device.type == "cuda" and 4 * n_params > 0.25 * torch.cuda.mem_get_info()[0]:
        home = torch.device("cpu")
    base = B.build_model(args.model, device=home, seed=args.seed, **args.overrides)
    vocab = B.model_limits(args.model, **args.overrides)[1]
    x_all = B.make_batch(args.batch_size, args.seq_len, vocab, seed=args.seed + 1)
    x = x_all.chunk(world)[rank].contiguous().to(device)
    local_batch = args.batch_size // world
    tokens_per_step = args.batch_size * args.seq_len
    if "pytorch" in names:
        fits, why = _fits_alone(n_params, dtype, device)
        if not fits:
            skipped["pytorch"] = f"does not fit: {why}"
            names.remove("pytorch")
    try:
        import importlib.metadata as md

        ds_version = md.version("deepspeed")
    except Exception:  # noqa: BLE001
        ds_version = None
    log(f"model {args.model}{' ' + str(args.overrides) if args.overrides else ''}: {n_params / 1e6:.2f}M "
        f"parameters; global batch {args.batch_size} x {args.seq_len} tokens ({local_batch} rows per rank); "
        f"{str(dtype).removeprefix('torch.')}; AdamW(lr={B.LR}, fused); {world} rank(s) on {device.type}"
        f"{' (gloo)' if world > 1 and device.type == 'cpu' else ''}, {torch.get_num_threads()} thread(s) per rank; "
        f"torch {torch.__version__}, deepspeed {ds_version}")
    if hardware is not None:
        log(f"hardware: {hardware.name} (Hardware.measure(), cached)")

    B.warm_process(device, base if home == device else None, x)

    builders = {}
    for n in names:  # partial binds the model now: `del base` below then frees it once the systems are built
        family = B.SYSTEMS[n][1]
        offload = n.endswith("-offload")
        if family == "pytorch":
            builders[n] = partial(B.build_pytorch, base, device, dtype)
        elif family == "fsdp2":
            builders[n] = partial(B.build_fsdp2, base, device, dtype, offload=offload)
        elif family == "deepspeed":
            builders[n] = partial(B.build_deepspeed, base, device, dtype, offload=offload, local_batch=local_batch,
                                  log=log)
        else:
            builders[n] = partial(B.build_elixir, base, device, dtype, x, hardware, optim_on_host=offload)
    systems, failed = B.build_all(builders, x, warmup=args.warmup, device=device, meters=meters, log=log,
                                  progress=progress)
    skipped.update(failed)
    del base, builders
    gc.collect()
    if not systems:
        log("no system could run")
        leave()
        return 1
    reps = B.compare(systems, x, reps=args.reps, steps=args.steps, tokens_per_step=tokens_per_step, device=device,
                     meters=meters, progress=progress, log=log)
    summary = B.summarize(systems, steps=args.steps, tokens_per_step=tokens_per_step, n_params=n_params,
                          world=world, meters=meters)
    wall_s = time.perf_counter() - started

    if rank == 0:
        print()
        print(B.format_table(summary, skipped, reps))
        print()
        for s in systems:
            print(f"  {s.name}: {s.description}; {s.note}")
        for r in summary["rows"]:
            if r.get("predicted_step_s"):
                print(f"{r['system']}: predicted step {r['predicted_step_s'] * 1e3:,.0f} ms "
                      f"(plan.predicted['step_s']), measured {r['step_s'] * 1e3:,.0f} ms (median): "
                      f"measured / predicted = {r['step_s'] / r['predicted_step_s']:.2f}")
        ref = summary["loss_reference"]
        diffs = ", ".join(f"{r['system']} {r['loss_rel_diff_first_steps']:.1e}" for r in summary["rows"]
                          if r["system"] != ref)
        if diffs:
            rtol = 1e-4 if dtype == torch.float32 else 2e-2
            worst = max(r["loss_rel_diff_first_steps"] for r in summary["rows"])
            print(f"losses over the first 5 steps, largest relative difference to {ref}: {diffs}"
                  + (f" (WARNING: above {rtol:g})" if worst > rtol else f" (all within {rtol:g})"))
        print(f"wall time {wall_s:.0f} s")
        if args.json:
            out = {
                "benchmark": "elixir bench",
                "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": "elixir bench " + " ".join(_argv(args)),
                "machine": {"platform": platform.platform(), "processor": platform.processor(),
                            "cpu_count": os.cpu_count(), "threads_per_rank": torch.get_num_threads(),
                            "device": str(device), "torch": torch.__version__, "deepspeed": ds_version,
                            "hardware": None if hardware is None else json.loads(hardware.to_json())},
                "config": {"model": args.model, "overrides": args.overrides, "n_params": n_params,
                           "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": str(dtype),
                           "world_size": world, "reps": reps, "steps": args.steps, "warmup": args.warmup,
                           "seed": args.seed, "tokens_per_step": tokens_per_step,
                           "optimizer": {"lr": B.LR, "betas": B.BETAS, "eps": B.EPS,
                                         "weight_decay": B.WEIGHT_DECAY, "fused": True}},
                **summary,
                "skipped": skipped,
                "wall_s": wall_s,
            }
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
            print(f"wrote {args.json}")
    B.barrier()
    leave()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
