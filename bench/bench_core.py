"""Core runtime benchmark: plain PyTorch vs Elixir all-resident vs Elixir all-on-demand, side by side.

All three systems train the same GPT (identical initial weights: deep copies of one model built from
one seed) in the compute dtype fp32 with `torch.optim.AdamW(lr=1e-4, fused=True)` on the same batch of
random byte tokens, in one process. After two warm-up steps per system, the systems alternate: every
repetition runs `--steps` timed steps of each system in turn (the order rotates between repetitions),
and each system's tokens/s for that repetition is recorded. Reported per system: the median tokens/s,
the median over repetitions of its ratio to PyTorch *within the same repetition* (robust to the
machine's load drifting between repetitions), the same ratio by process CPU time, and for Elixir the
peak model-data bytes per tier as `elixir.memory_stats` counts them.

The three systems compute the same fp32 math on the same data, so their losses at every step must
agree to ~1e-5 relative; the script checks every step and exits with status 1 when they do not.

    python bench/bench_core.py                       # 50m preset, batch 4 x 256, 5 reps x 3 steps
    python bench/bench_core.py --reps 15 --steps 1 --json results.json   # finer alternation
"""

from __future__ import annotations

import argparse
import copy
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
from elixir.models import GPT, GPTConfig
from elixir.runtime import runtime_of

SYSTEMS = ("pytorch", "elixir-resident", "elixir-ondemand")
DESCRIPTIONS = {
    "pytorch": "plain PyTorch",
    "elixir-resident": "Elixir, all chunks resident, homes on device",
    "elixir-ondemand": "Elixir, all chunks on demand, homes on host",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="50m", help=f"GPT preset ({', '.join(GPTConfig.preset_names())})")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per system per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions (each runs every system once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system before the first rep")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batch")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--resident-chunk-mib", type=float, default=32.0, help="chunk size of the all-resident system"
    )
    p.add_argument(
        "--ondemand-chunk-mib", type=float, default=16.0,
        help="chunk size of the on-demand system (must hold the largest parameter)",
    )
    p.add_argument("--cache-blocks", type=int, default=4, help="cache blocks of the on-demand system")
    p.add_argument("--prefetch-depth", type=int, default=2, help="prefetch depth of both Elixir systems")
    p.add_argument("--rtol", type=float, default=1e-5, help="largest relative loss difference accepted")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "steps", "reps", "threads", "cache_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    return args


class System:
    """One trainable system: a model, its optimizer, its losses so far."""

    def __init__(self, name: str, model: torch.nn.Module, optim: torch.optim.Optimizer, wrapped: bool):
        self.name = name
        self.model = model
        self.optim = optim
        self.wrapped = wrapped
        self.losses: list[torch.Tensor] = []
        self.tokens_per_s: list[float] = []
        self.tokens_per_cpu_s: list[float] = []

    def step(self, x: torch.Tensor) -> None:
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.optim.step()
        self.optim.zero_grad()
        self.losses.append(loss.detach())


def build_systems(args, device: torch.device) -> tuple[list[System], int, dict]:
    torch.manual_seed(args.seed)
    cfg = GPTConfig.preset(args.model)
    if args.seq_len > cfg.block_size:
        raise SystemExit(
            f"--seq-len {args.seq_len} exceeds the {args.model} preset's block_size {cfg.block_size}"
        )
    base = GPT(cfg)
    n_params = base.num_params()

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    systems = []
    ref = copy.deepcopy(base).to(device).train()
    systems.append(System("pytorch", ref, adamw(ref), wrapped=False))

    plans = {}
    for name, kw in (
        ("elixir-resident", dict(chunk_mib=args.resident_chunk_mib, resident=True,
                                 param_home="device", optim_home="device")),
        ("elixir-ondemand", dict(chunk_mib=args.ondemand_chunk_mib, resident=False,
                                 param_home="host", optim_home="host")),
    ):
        m = copy.deepcopy(base).train()
        opt = adamw(m)
        plan = elixir.Plan.uniform(
            m, cache_blocks=args.cache_blocks, compute_dtype=torch.float32,
            prefetch_depth=args.prefetch_depth, optimizer=opt, **kw,
        )
        m, opt = elixir.wrap(m, opt, plan=plan, device=device)
        plans[name] = plan
        systems.append(System(name, m, opt, wrapped=True))
    del base
    return systems, n_params, plans


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pytorch_model_bytes(system: System) -> int:
    """Parameters + optimizer states that plain PyTorch holds (gradients are freed by zero_grad)."""
    n = sum(p.numel() * p.element_size() for p in system.model.parameters())
    for st in system.optim.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.numel() > 1)
    return n


def fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def peak(row: dict, tier: str) -> str:
    now, first = row[f"{tier}_bytes_peak"], row.get(f"{tier}_bytes_peak_incl_warmup")
    if now is None:
        return "-"
    return fmt_mib(now) + (f" [{fmt_mib(first)}]" if first is not None and first > now else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = elixir.accel.default_device()

    t0 = time.perf_counter()
    systems, n_params, plans = build_systems(args, device)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, 256, (args.batch_size, args.seq_len), generator=g).to(device)
    tokens_per_step = args.batch_size * args.seq_len
    print(
        f"model {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch_size} x seq {args.seq_len}, "
        f"fp32, AdamW(lr=1e-4, fused=True), device {device}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    for name, plan in plans.items():
        print(f"{name}: {len(plan.chunks)} chunks of {plan.chunk_numel * 4 / 2**20:g} MiB"
              + ("" if plan.chunks[0].resident else f", {plan.cache_blocks} cache blocks"))

    for s in systems:
        for _ in range(args.warmup):
            s.step(x)
    sync(device)
    gathers_before = {s.name: elixir.memory_stats(s.model)["gathers"] for s in systems if s.wrapped}
    # The first backward learns each chunk's gradient count and holds every gradient buffer until its
    # end; keep that peak apart and measure the steady state from here on.
    warmup_peaks = {}
    for s in systems:
        if s.wrapped:
            st = elixir.memory_stats(s.model)
            warmup_peaks[s.name] = (st["device_bytes_peak"], st["host_bytes_peak"])
            runtime_of(s.model).tracker.reset_peak()

    order = list(systems)
    for rep in range(args.reps):
        for s in order:
            gc.collect()
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                s.step(x)
            sync(device)
            s.tokens_per_s.append(args.steps * tokens_per_step / (time.perf_counter() - start))
            s.tokens_per_cpu_s.append(args.steps * tokens_per_step / (time.process_time() - cpu_start))
        line = "  ".join(f"{s.name} {s.tokens_per_s[-1]:8.0f}" for s in systems)
        print(f"rep {rep + 1}/{args.reps} tokens/s: {line}", flush=True)
        order = order[1:] + order[:1]  # rotate who runs first
    total_s = time.perf_counter() - t0

    # --- losses must agree -------------------------------------------------------------------
    losses = {s.name: [float(v) for v in s.losses] for s in systems}
    ref = losses["pytorch"]
    max_rel = {}
    for s in systems[1:]:
        max_rel[s.name] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[s.name], ref))
    losses_ok = all(v <= args.rtol for v in max_rel.values())

    # --- results -----------------------------------------------------------------------------
    timed_steps = args.reps * args.steps
    ref_tps = systems[0].tokens_per_s
    ref_tpc = systems[0].tokens_per_cpu_s
    results = []
    for s in systems:
        ratios = [a / b for a, b in zip(s.tokens_per_s, ref_tps)]
        cpu_ratios = [a / b for a, b in zip(s.tokens_per_cpu_s, ref_tpc)]
        row = {
            "system": s.name,
            "description": DESCRIPTIONS[s.name],
            "tokens_per_s": s.tokens_per_s,
            "median_tokens_per_s": statistics.median(s.tokens_per_s),
            "ratio_per_rep": ratios,
            "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
            "tokens_per_cpu_s": s.tokens_per_cpu_s,
            "cpu_ratio_per_rep": cpu_ratios,
            "median_cpu_ratio": statistics.median(cpu_ratios),
            "best_rep_ratio": max(s.tokens_per_s) / max(ref_tps),
            "max_rel_loss_diff": max_rel.get(s.name, 0.0),
        }
        if s.wrapped:
            st = elixir.memory_stats(s.model)
            row.update({
                "num_chunks": st["num_chunks"],
                "cache_blocks": st["cache_blocks"],
                "device_bytes_peak": st["device_bytes_peak"],
                "host_bytes_peak": st["host_bytes_peak"],
                "device_bytes_peak_incl_warmup": max(st["device_bytes_peak"], warmup_peaks[s.name][0]),
                "host_bytes_peak_incl_warmup": max(st["host_bytes_peak"], warmup_peaks[s.name][1]),
                "gathers_per_step": (st["gathers"] - gathers_before[s.name]) / timed_steps,
            })
        else:
            row.update({"num_chunks": None, "cache_blocks": None, "device_bytes_peak": None,
                        "host_bytes_peak": None, "gathers_per_step": None,
                        "params_plus_optim_bytes": pytorch_model_bytes(s)})
        results.append(row)

    print()
    print(f"| system | chunks | median tokens/s | ratio to PyTorch (median, min-max over {args.reps} reps) "
          "| ratio by CPU time (median) | ratio of best reps "
          "| peak device model data (MiB) | peak host model data (MiB) | gathers/step |")
    # peaks: after warm-up (steady state); the first step's peak, when higher, follows in brackets
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        chunks = "-" if r["num_chunks"] is None else (
            f"{r['num_chunks']}" + (f" ({r['cache_blocks']} blocks)" if r["cache_blocks"] else ""))
        gps = "-" if r["gathers_per_step"] is None else f"{r['gathers_per_step']:g}"
        print(f"| {r['description']} | {chunks} | {r['median_tokens_per_s']:,.0f} | "
              f"{r['median_ratio']:.3f} ({r['min_ratio']:.3f}-{r['max_ratio']:.3f}) | "
              f"{r['median_cpu_ratio']:.3f} | {r['best_rep_ratio']:.3f} | "
              f"{peak(r, 'device')} | {peak(r, 'host')} | {gps} |")
    print()
    pt = results[0]["params_plus_optim_bytes"]
    print("(Ratio by CPU time: the same ratio with the process's CPU seconds in place of wall seconds; "
          "less sensitive to other jobs taking the cores, but it counts OpenMP spin-waits. Ratio of best "
          "reps: best tokens/s over best tokens/s, an estimate for an idle machine.)")
    print(f"(PyTorch holds {fmt_mib(pt)} MiB of parameters + AdamW states, plus gradients during backward. "
          "Elixir peaks are after warm-up; [brackets]: the peak including the first step, when higher.)")
    agree = ", ".join(f"{k} {v:.2e}" for k, v in max_rel.items())
    n_cmp = len(ref)
    print(f"losses over {n_cmp} steps, largest relative difference to PyTorch: {agree} "
          f"(tolerance {args.rtol:g}): {'OK' if losses_ok else 'MISMATCH'}")
    print(f"first/last loss: {ref[0]:.6f} / {ref[-1]:.6f}; wall time {total_s:.0f} s")

    if args.json:
        out = {
            "benchmark": "core runtime",
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpu_count": os.cpu_count(),
                "threads": args.threads,
                "torch": torch.__version__,
                "device": str(device),
            },
            "config": vars(args) | {"n_params": n_params, "tokens_per_step": tokens_per_step},
            "results": results,
            "losses": losses,
            "losses_ok": losses_ok,
            "wall_s": total_s,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")

    if not losses_ok:
        print("FAIL: the systems' losses disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
