"""Stage (b) of the GPU benchmark: a model about twice the device memory it is given, with host offload.

OPT-2.7B dimensions (2.65 B parameters: 42 GB of fp32 masters, gradients and AdamW states, plus 5 GB of bf16
weights) on a GPU capped at --cap-gib 20 GiB with torch.cuda.set_per_process_memory_fraction, bf16, one
system per process (--system), since host memory cannot hold both systems' offloaded states at once:
  elixir         the plan elixir.plan searches for the capped GPU (Hardware.measure() with device memory
                 = the cap); should that plan run out of device memory, it is searched again for 80%, then
                 60% of the cap, and the JSON says so
  fsdp2-offload  FSDP2 fully_shard per block + root, CPUOffloadPolicy(pin_memory=True),
                 MixedPrecisionPolicy(bf16, reduce fp32), torch.optim.AdamW(fused) on the CPU
With --dry-run: a shrunk OPT on the CPU, "capped" (for the planner only) at half of what its all-resident
plan needs.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from functools import partial

import gpubench as G
import torch

import elixir
from elixir import benchmark as B
from elixir.hardware import Hardware


def main() -> int:
    p = G.parser(__doc__.splitlines()[0], budget_s=140)
    p.add_argument("--system", choices=("elixir", "fsdp2-offload"), required=True)
    p.add_argument("--model", default="opt-2.7b", help="family preset (default: opt-2.7b)")
    p.add_argument("--cap-gib", type=float, default=20.0, help="device memory given to the model (default: 20)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if args.dry_run:  # a toy whose model data outweighs its activations, as the real model's does
        args.batch_size, args.seq_len, args.reps, args.steps, args.warmup = 2, 32, 2, 1, 1
    device = G.device_for(args)
    dtype = torch.bfloat16
    stage = f"offload-{args.system}"
    hw = Hardware.measure()
    result: dict = {"machine": G.machine(device), "hardware": hw.name, "system": args.system}

    # the model: built on the GPU (fast initialisation), then moved to the host, where both systems start
    build_on = device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = int(args.cap_gib * G.GiB)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    base = G.family_model(args.model, build_on, dry_run=args.dry_run, width=256, layers=4)
    base = base.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n_params = B.num_params(base)
    x = B.make_batch(args.batch_size, args.seq_len, G.vocab_of(base)).to(device)
    tokens = args.batch_size * args.seq_len
    batch = {"input_ids": x, "labels": x}
    if device.type != "cuda":
        # the dry run's cap: half of what the all-resident plan needs on the device
        need = elixir.plan(base, batch, hardware=hw, compute_dtype=dtype).predicted["device_bytes_peak"]
        cap = int(need / 2)
    result["config"] = {"model": args.model, "n_params": n_params, "batch_size": args.batch_size,
                        "seq_len": args.seq_len, "dtype": "bf16", "cap_bytes": cap,
                        "model_data_bytes": 16 * n_params, "warmup": args.warmup, "steps": args.steps}
    G.log(f"{args.model}{' (shrunk)' if args.dry_run else ''}: {n_params / 1e6:,.1f}M parameters "
          f"({16 * n_params / G.GiB:.2f} GiB of fp32 model data, {16 * n_params / cap:.1f}x the cap of "
          f"{cap / G.GiB:.2f} GiB); batch {args.batch_size} x {args.seq_len}; bf16; {args.system}")
    B.warm_process(device)
    meters = B.meters_for(device)
    leave = lambda: None  # noqa: E731
    systems, skipped, attempts = [], {}, []
    if args.system == "fsdp2-offload":
        leave = B.single_process_group(device)
        systems, skipped = B.build_all({"fsdp2-offload": partial(B.build_fsdp2, base, device, dtype, offload=True)},
                                       x, warmup=args.warmup, device=device, meters=meters, log=G.log)
    else:
        for factor in (1.0, 0.8, 0.6):
            capped = hw.with_memory(device_bytes=int(cap * factor))
            try:
                plan = elixir.plan(base, batch, hardware=capped, compute_dtype=dtype)
            except elixir.PlanDoesNotFitError as e:
                attempts.append({"plan_for_bytes": int(cap * factor), "error": G.error_text(e)})
                G.log(f"no plan fits {factor:.0%} of the cap: {e}")
                break
            G.log(f"plan for {factor:.0%} of the cap ({cap * factor / G.GiB:.2f} GiB):\n{plan.summary()}")
            systems, skipped = B.build_all(
                {"elixir": partial(B.build_elixir, base, device, dtype, x, capped, plan=plan)},
                x, warmup=args.warmup, device=device, meters=meters, log=G.log)
            attempts.append({"plan_for_bytes": int(cap * factor), "plan": plan.summary(),
                             "predicted": plan.predicted, "error": skipped.get("elixir")})
            if systems or "OutOfMemoryError" not in (skipped.get("elixir") or ""):
                break
            gc.collect()
            torch.cuda.empty_cache()
        result["attempts"] = attempts
    del base
    gc.collect()
    result["skipped"] = skipped
    if not systems:
        G.write_json(args, stage, result)
        leave()
        return 1
    started = time.perf_counter()
    reps = B.compare(systems, x, reps=args.reps, steps=args.steps, tokens_per_step=tokens, device=device,
                     meters=meters, deadline=G.deadline(args), log=G.log, progress=B.Progress())
    summary = B.summarize(systems, steps=args.steps, tokens_per_step=tokens, n_params=n_params, world=1,
                          meters=meters)
    result["config"]["reps"] = reps
    if device.type == "cuda":
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    print(B.format_table(summary, skipped, reps), flush=True)
    if systems[0].plan is not None:
        result["plan"] = systems[0].plan.summary()
        result["plan_hardware"] = dataclasses.asdict(hw) | {"device_bytes": attempts[-1]["plan_for_bytes"]}
    G.write_json(args, stage, result | summary | {"timed_s": time.perf_counter() - started})
    leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
