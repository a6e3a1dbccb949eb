"""Stage (a) of the GPU benchmark: a model that fits, in bf16: plain PyTorch eager against Elixir's searched plan.

OPT-1.3B dimensions (a shrunk OPT with --dry-run), one batch of random tokens, AdamW(fused) with fp32
master weights in every system:
  pytorch      eager: a bf16 copy computes, fp32 masters and AdamW states (Elixir's math)
  pytorch-amp  eager: fp32 weights under torch.autocast(bf16)
  elixir       the plan elixir.plan searches for this GPU (Hardware.measure())
The systems alternate (--reps repetitions of --steps steps each, the order rotating); per system the
median tokens/s, TFLOPS (6 x params x tokens / step time), the peak memory it adds
(torch.cuda.max_memory_allocated) and, for Elixir, the plan's predicted step time and peak memory.
"""

from __future__ import annotations

import gc
import sys
import time
from functools import partial

import gpubench as G
import torch

from elixir import benchmark as B
from elixir.hardware import Hardware


def main() -> int:
    p = G.parser(__doc__.splitlines()[0], budget_s=180)
    p.add_argument("--model", default="opt-1.3b", help="family preset (default: opt-1.3b)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if args.dry_run:
        args.batch_size, args.seq_len, args.reps, args.steps, args.warmup = 4, 64, 2, 1, 1
    device = G.device_for(args)
    dtype = torch.bfloat16
    if device.type == "cuda":
        torch.zeros(1, device=device)
    hw = Hardware.measure()
    G.log(f"hardware {hw.name}: {hw.device_bytes / G.GiB:.0f} GiB device, "
          f"bf16 matmul {hw.matmul_flops.get('bfloat16', 0) / 1e12:.3g} TFLOPS measured")
    base = G.family_model(args.model, device, dry_run=args.dry_run)
    n_params = B.num_params(base)
    x = B.make_batch(args.batch_size, args.seq_len, G.vocab_of(base)).to(device)
    tokens = args.batch_size * args.seq_len
    G.log(f"{args.model}{' (shrunk)' if args.dry_run else ''}: {n_params / 1e6:,.1f}M parameters; "
          f"batch {args.batch_size} x {args.seq_len}; bf16")
    B.warm_process(device, base, x[:1])
    meters = B.meters_for(device)
    builders = {
        "pytorch": partial(B.build_pytorch, base, device, dtype),
        "pytorch-amp": partial(B.build_pytorch, base, device, dtype, amp=True),
        "elixir": partial(B.build_elixir, base, device, dtype, x, hw),
    }
    systems, skipped = B.build_all(builders, x, warmup=args.warmup, device=device, meters=meters, log=G.log)
    del base, builders
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = {"model": args.model, "n_params": n_params, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "dtype": "bf16", "reps": args.reps, "steps": args.steps, "warmup": args.warmup}
    result = {"machine": G.machine(device), "hardware": hw.name, "config": config, "skipped": skipped}
    if not systems:
        G.write_json(args, "fits", result)
        return 1
    started = time.perf_counter()
    reps = B.compare(systems, x, reps=args.reps, steps=args.steps, tokens_per_step=tokens, device=device,
                     meters=meters, deadline=G.deadline(args), log=G.log,
                     progress=B.Progress())
    summary = B.summarize(systems, steps=args.steps, tokens_per_step=tokens, n_params=n_params, world=1,
                          meters=meters)
    config["reps"] = reps
    print(B.format_table(summary, skipped, reps), flush=True)
    elixir_sys = next((s for s in systems if s.name == "elixir"), None)
    if elixir_sys is not None:
        result["plan"] = elixir_sys.plan.summary()
    G.write_json(args, "fits", result | summary | {"timed_s": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    sys.exit(main())
