"""Stage (b) of the GPU benchmark: OPT-2.7B at 64k tokens per step, Elixir on half the model data's memory.

OPT-2.7B dimensions (2.65 B parameters, 42 GB of fp32 model data: master, gradient, two AdamW states), bf16,
a global batch of 64 sequences of 1024 tokens (gpubench.SEQ_LEN says why 1024), AdamW(fused), the gradient
clipped to norm 1.0 every step, one system per process (--system):
  pytorch        plain PyTorch with the whole GPU: a bf16 copy computes, fp32 masters and AdamW (Elixir's
                 math), micro-batches of --micro-batch sequences (16: its activations without checkpointing,
                 44 GiB by elixir.profile, fit beside the 49 GiB of model data; 32 would not), halved should
                 that run out of memory
  elixir         the plan elixir.plan(..., tokens_per_step=65536) searches for the GPU capped at half the model
                 data (Hardware.measure().with_memory(device_bytes=cap), and the allocator capped with
                 torch.cuda.set_per_process_memory_fraction); should it run out of memory, the plan searched
                 for 80% of the cap
  fsdp2-offload  FSDP2 fully_shard per block + root, CPUOffloadPolicy(pin_memory=True), MixedPrecisionPolicy(
                 bf16, reduce fp32), AdamW on the host, under the same cap, with Elixir's micro-batch and
                 accumulation and the least activation checkpointing (none, every 2nd, every block) whose
                 activations (elixir.profile of that micro-batch) fill at most 80% of the cap; every block
                 should that run out of memory
The plans come from the plans stage ($OUT/plans.json), or are searched here. Reported per system: tokens/s,
TFLOPS (6 x params x tokens / step time: model FLOPs, the same work for all; the hardware TFLOPS with
recomputation in the JSON), peak device memory (allocated and reserved), host memory (RSS) per parameter,
allocations per timed step (CUDA's cudaMalloc and pinned host blocks, Elixir's tracker), grad norms, and for
Elixir the predicted step and elixir.step_stats (speculated steps, rollbacks and why).
With --dry-run: the shrunk OPT on the CPU, 8 sequences of 16 tokens, the cap for the planner only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import gpubench as G

import elixir
from elixir import bench as B

ACTIVATION_SHARE = 0.8
"""FSDP2's activations may fill this share of the cap; its gathered blocks and the allocator take the rest."""


def fsdp2_checkpointing(point: dict, cap_bytes: int) -> int:
    """The least recomputation (none, every 2nd, every block) whose activations fit FSDP2 under the cap."""
    need = point.get("activation_bytes") or {}
    return next((every for every in (0, 2, 1) if need.get(str(every), cap_bytes) <= ACTIVATION_SHARE * cap_bytes), 1)


def main() -> int:
    p = G.parser(__doc__.splitlines()[0], budget_s=90)
    p.add_argument("--system", choices=("pytorch", "elixir", "fsdp2-offload"), required=True)
    p.add_argument("--model", default=G.OFFLOAD_MODEL, help=f"family preset (default: {G.OFFLOAD_MODEL})")
    p.add_argument("--micro-batch", type=int, default=16, help="PyTorch's sequences per micro-batch (default: 16)")
    p.add_argument("--reps", type=int, default=3, help="timed steps, one per repetition (default: 3)")
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    device = G.device_for(args)
    G.freeze_gc()
    stage = f"offload-{args.system}"
    hw = G.hardware(args)
    setup = G.Setup.of(args.model, args.dry_run)
    tokens = setup.tokens(G.OFFLOAD_TOKENS)
    sequences = setup.sequences(tokens)
    result: dict = {"machine": G.machine(device), "hardware": hw.name, "system": args.system,
                    "config": setup.describe() | {"tokens_per_step": tokens, "sequences": sequences,
                                                  "warmup": args.warmup},
                    "attempts": []}
    G.log(f"{args.model}{' (shrunk)' if args.dry_run else ''}: {setup.n_params / 1e6:,.1f}M parameters "
          f"({setup.model_data_bytes / G.GiB:.2f} GiB of model data); {sequences} x {setup.seq_len} tokens per "
          f"step; bf16; {args.system}" + ("" if args.system == "pytorch" else
                                          f" on a cap of {setup.cap_bytes / G.GiB:.2f} GiB"))

    if args.system != "pytorch":
        G.cap_device(device, setup.cap_bytes)
    # built on the device (fast initialisation; the same values in every stage), then kept on the host
    base = G.offload_model(args.model, device, dry_run=args.dry_run).to("cpu")
    G.free_device(device)
    attempts, leave = configurations(args, setup, hw, base, device, result)
    if not attempts:
        G.write_json(args, stage, result)
        return 1
    x = B.make_batch(sequences, setup.seq_len, setup.vocab_size).to(device)
    B.warm_process(device)

    chosen = None
    for attempt in attempts:
        plan = attempt.get("plan")
        G.log(f"{args.system}: {attempt['what']}" + (f"\n{plan.summary()}" if plan is not None else ""))
        row, error = G.measure(args.system, attempt["build"], x, args=args, n_params=setup.n_params,
                               reps=args.reps, warmup=args.warmup, checkpoint_every=attempt["checkpoint_every"])
        result["attempts"].append({"what": attempt["what"], "error": error})
        G.free_device(device)
        if row is not None and chosen is None:
            chosen = attempt, row
        # on the GPU the first that runs is measured; the dry run tries every one, so that the retries the
        # GPU run makes only on running out of memory run somewhere
        if not args.dry_run and (row is not None or not G.is_oom(error)):
            break
    leave()
    if chosen is None:
        G.write_json(args, stage, result)
        return 1
    attempt, row = chosen
    mb = attempt["micro_batch_size"]
    result["config"] |= {"micro_batch_size": mb, "grad_accum": sequences // mb,
                         "checkpoint_every": attempt["checkpoint_every"], "ran": attempt["what"]}
    if attempt.get("plan") is not None:
        result |= {"plan": attempt["plan"].summary(), "plan_cap_bytes": attempt["plan_cap_bytes"]}
    print(B.format_table({"rows": [row]}, {}, row["reps"]), flush=True)
    G.write_json(args, stage, result | {"rows": [row]})
    G.log(f"{args.system} ({attempt['what']}): {row['tokens_per_s']:,.0f} tokens/s, {row['tflops_per_rank']:.3g} "
          f"TFLOPS, {row['host_bytes_per_param']:.1f} host bytes per parameter; allocations per timed step: "
          + ", ".join(f"{k} {v:g}" for k, v in row["per_step_counters"].items() if v is not None)
          + (f"; rollbacks {row['timed_step_stats']['rollbacks']} of {row['timed_step_stats']['steps']} timed steps"
             if "timed_step_stats" in row else ""))
    return 0


def configurations(args, setup: G.Setup, hw, base, device, result: dict) -> tuple[list[dict], Callable]:
    """The system's configurations to try in order: on the GPU until one runs, or one fails otherwise than
    by running out of device memory. Each: what it is, its builder, micro-batch, checkpointing (and the
    plan). Also returns the function that leaves the process group FSDP2 needs."""
    sequences = setup.sequences(setup.tokens(G.OFFLOAD_TOKENS))
    if args.system == "pytorch":
        first = setup.sequences_of(args.micro_batch * G.SEQ_LEN)
        return [{"what": f"micro-batch {mb}", "build": partial(G.build_pytorch, base, device, mb),
                 "micro_batch_size": mb, "checkpoint_every": 0}
                for mb in (first, first // 2, first // 4) if mb >= 1 and sequences % mb == 0], lambda: None
    tokens = setup.tokens(G.OFFLOAD_TOKENS)
    point = G.find_plan(args, setup, hw, tokens, setup.cap_bytes, activations=args.system == "fsdp2-offload")
    result["plan_search"] = {k: point[k] for k in ("plan_s", "searched_in", "activation_bytes", "error")
                             if k in point}
    if "error" in point:
        G.log(f"no plan fits the cap: {point['error']}")
        return [], lambda: None
    if args.system == "fsdp2-offload":
        mb = point["micro_batch_size"]
        return [{"what": f"Elixir's micro-batch {mb}, checkpointing every {every} block(s) (0: none)",
                 "build": partial(G.build_fsdp2_offload, base, device, mb, every), "micro_batch_size": mb,
                 "checkpoint_every": every}
                for every in dict.fromkeys((fsdp2_checkpointing(point, setup.cap_bytes), 1))], \
            B.single_process_group(device)
    spare_cap = int(setup.cap_bytes * G.SPARE_CAP)
    attempts = []
    for what, pt, cap in (("plan for the cap", point, setup.cap_bytes),
                          (f"plan for {G.SPARE_CAP:.0%} of the cap", G.find_plan(args, setup, hw, tokens, spare_cap),
                           spare_cap)):
        if "error" not in pt:
            plan = elixir.Plan.from_json(pt["plan"])
            attempts.append({"what": what, "build": partial(G.build_elixir, base, device, plan), "plan": plan,
                             "plan_cap_bytes": cap, "micro_batch_size": plan.micro_batch_size,
                             "checkpoint_every": plan.checkpoint_every})
    return attempts, lambda: None

if __name__ == "__main__":
    sys.exit(main())
