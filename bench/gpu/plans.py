"""Stage: the planner's searches for the offload stage and the curve, in parallel, on the CPUs only.

elixir.plan(..., tokens_per_step=N) on OPT-2.7B takes tens of seconds of Python per global batch (a trace per
checkpointing option, then the cost model over micro-batches and placements), and the GPU would wait through
six of them. So run.sh starts this stage in the background after parity, beside the checkpoint and PyTorch
stages (which keep the GPU busy and leave the CPUs idle), and the Elixir and FSDP2 stages read the plans
from $OUT/plans.json. Searched, each in its own worker process, on a meta-device copy of the model, for the
machine of $OUT/hardware.json with its device memory capped at half the model data (gpubench.Setup):
  - OFFLOAD_TOKENS per step, with the activation bytes of its micro-batch under each checkpointing option
    (FSDP2 chooses its checkpointing from them);
  - the same for SPARE_CAP of the cap (the offload stage's retry should the plan run out of memory);
  - each of CURVE_TOKENS.
A stage that finds no plan here searches it itself, so every stage also runs alone.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import gpubench as G


def main() -> int:
    p = G.parser(__doc__.splitlines()[0], budget_s=100)
    p.add_argument("--model", default=G.OFFLOAD_MODEL, help=f"family preset (default: {G.OFFLOAD_MODEL})")
    args = p.parse_args()
    # The workers are forked before this process touches CUDA (the measurement of the machine may): a child
    # forked after CUDA is initialised cannot use it, and these need nothing but CPUs and the meta device.
    G.freeze_gc()  # before the fork: the workers inherit the imports, and never touch their objects' gc headers
    jobs = [(G.OFFLOAD_TOKENS, 1.0, True), (G.OFFLOAD_TOKENS, G.SPARE_CAP, False)]
    jobs += [(tokens, 1.0, False) for tokens in G.CURVE_TOKENS]
    with multiprocessing.get_context("fork").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        hw = G.hardware(args)
        setup = G.Setup.of(args.model, args.dry_run)
        G.log(f"{args.model}{' (shrunk)' if args.dry_run else ''}: {setup.n_params / 1e6:,.1f}M parameters, cap "
              f"{setup.cap_bytes / G.GiB:.2f} GiB; searching {len(jobs)} plans in parallel")
        pending = []
        for tokens, share, activations in jobs:
            cap = int(setup.cap_bytes * share)
            job = (setup.model, setup.dry_run, hw.with_memory(device_bytes=cap).to_json(), setup.tokens(tokens))
            pending.append(pool.apply_async(G.search_plan, job, {"activations": activations}))
        result: dict = {"hardware": hw.name, "setup": setup.describe(), "points": []}
        stop = G.STARTED + 0.9 * args.budget_s  # then the pool's workers are ended, not left to run on
        for job in pending:
            try:
                point = job.get(timeout=max(0.0, stop - time.perf_counter()))
            except multiprocessing.TimeoutError:
                G.log("time box reached: the stages that need the other plans search them themselves")
                return 1
            result["points"].append(point)
            G.log(f"{point['tokens_per_step']:,} tokens per step, cap {point['cap_bytes'] / G.GiB:.2f} GiB: "
                  + (f"no plan: {point['error']}" if "error" in point else
                     f"micro-batch {point['micro_batch_size']} x {point['grad_accum']}, checkpointing every "
                     f"{point['checkpoint_every']} block(s) (0: none), predicted "
                     f"{point['predicted']['step_s']:.3f} s per step")
                  + f"; searched in {point['plan_s']:.1f} s")
            G.write_json(args, "plans", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
