"""Stage (c) of the GPU benchmark: Elixir alone over global batches of 8k to 128k tokens, under the same cap.

The offload stage's model, sequences and cap (gpubench.Setup); for each of CURVE_TOKENS (the offload stage
measures 64k) the plan elixir.plan(..., tokens_per_step=N) searches (from the plans stage, or here), a fresh
Elixir system under it, one warm-up step and 1 to 3 timed steps (as many as fit in CURVE_POINT_S at the
predicted step time), the predicted and measured step and the TFLOPS. A point starts only when its
estimated time (the previous point's build, and its steps at 1.5x the predicted time) fits in what is left
of the time box; the points not measured are listed with the reason.
With --dry-run: the shrunk OPT on the CPU, an eighth of the sequences (at least one), of 16 tokens.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import gpubench as G

import elixir
from elixir import bench as B

CURVE_POINT_S = 8.0
"""Seconds of timed steps a point aims at (at the predicted step time)."""
FIRST_BUILD_S = 15.0
"""The estimate of building and wrapping the model before any point has been built here."""


def main() -> int:
    p = G.parser(__doc__.splitlines()[0], budget_s=130)
    p.add_argument("--model", default=G.OFFLOAD_MODEL, help=f"family preset (default: {G.OFFLOAD_MODEL})")
    args = p.parse_args()
    device = G.device_for(args)
    G.freeze_gc()
    hw = G.hardware(args)
    setup = G.Setup.of(args.model, args.dry_run)
    G.cap_device(device, setup.cap_bytes)
    base = G.offload_model(args.model, device, dry_run=args.dry_run).to("cpu")
    G.free_device(device)
    points = [setup.tokens(t) for t in G.CURVE_TOKENS]
    x = B.make_batch(setup.sequences(max(points)), setup.seq_len, setup.vocab_size).to(device)
    B.warm_process(device)
    result: dict = {"machine": G.machine(device), "hardware": hw.name, "config": setup.describe(), "points": [],
                    "skipped": {}}
    G.log(f"{args.model}{' (shrunk)' if args.dry_run else ''}: Elixir at "
          + ", ".join(f"{t:,}" for t in points) + f" tokens per step, cap {setup.cap_bytes / G.GiB:.2f} GiB")
    build_s = FIRST_BUILD_S
    stop = G.STARTED + 0.9 * args.budget_s
    for tokens in points:
        point = G.find_plan(args, setup, hw, tokens, setup.cap_bytes)
        if "error" in point:
            result["skipped"][str(tokens)] = f"no plan: {point['error']}"
            continue
        plan = elixir.Plan.from_json(point["plan"])
        predicted_s = plan.predicted["step_s"]
        reps = max(1, min(3, int(CURVE_POINT_S // predicted_s)))
        need_s = build_s + 1.5 * (1 + reps) * predicted_s
        if time.perf_counter() + need_s > stop:
            result["skipped"][str(tokens)] = (f"time box: needs about {need_s:.0f} s, "
                                              f"{max(0.0, stop - time.perf_counter()):.0f} s left")
            G.log(f"{tokens:,} tokens per step: {result['skipped'][str(tokens)]}")
            continue
        G.log(f"{tokens:,} tokens per step, {reps} timed steps:\n{plan.summary()}")
        started = time.perf_counter()
        row, error = G.measure("elixir", partial(G.build_elixir, base, device, plan),
                               x[: setup.sequences(tokens)], args=args, n_params=setup.n_params, reps=reps,
                               warmup=1, checkpoint_every=plan.checkpoint_every, stop_at=stop)
        G.free_device(device)
        # what the point left behind: the next point's host memory comes on top of it (a pinned host cache
        # on a GPU keeps blocks for reuse)
        rss_after = B.MemoryMeter("rss").now()
        if row is None:
            result["skipped"][str(tokens)] = error
            continue
        build_s = time.perf_counter() - started - sum(row["seconds_per_rep"]) - row["step_s"]  # less warm-up
        result["points"].append({
            "tokens_per_step": tokens, "micro_batch_size": plan.micro_batch_size, "grad_accum": plan.grad_accum,
            "checkpoint_every": plan.checkpoint_every, "plan": plan.summary(), "plan_search_s": point["plan_s"],
            "searched_in": point["searched_in"], "build_s": build_s, "rss_after_bytes": rss_after, "row": row,
        })
        G.log(f"{tokens:,} tokens per step: {row['step_s']:.3f} s measured, {predicted_s:.3f} s predicted, "
              f"{row['tflops_per_rank']:.3g} TFLOPS; rollbacks {row['timed_step_stats']['rollbacks']} of "
              f"{row['timed_step_stats']['steps']}")
        G.write_json(args, "curve", result)
    G.write_json(args, "curve", result)
    return 0 if not result["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
