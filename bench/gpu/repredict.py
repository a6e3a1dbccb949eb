"""Stage (d)'s recorded GPU measurements, predicted again on any machine by the cost model as it is now.

A run of bench/gpu/fidelity.py keeps its machine's rates (hardware.json), each model's compute scale (its block
timed on the device) and each plan's measured step (fidelity.json). This rebuilds every model of such a run from
its config, profiles it on the meta device, searches its plans for the recorded rates exactly as the run did (so
the plans are the ones that were measured), and predicts each one's step again: with the recorded rates, and
with the rates changed by `--scale FIELD=FACTOR` (to ask what a different calibration would have predicted).
Prints, per plan, the prediction logged in the run, the two new ones and the measured step, then the median and
worst error and the count within 10% of each column. Needs no GPU; a GPU-sized model takes seconds to profile.

    python bench/gpu/repredict.py bench/gpu/recorded/h200-2026-12-04-call3 [--scale host_optim_elems_per_s=0.76]
    python bench/gpu/repredict.py bench/gpu/recorded/h200-2026-12-04-call2 --offload

With --offload, the run's offload stage (b) instead (offload-elixir.json): its plan searched again for the recorded
rates and cap, as the stage searched it (the plan's summary must match the recorded one), and its step predicted.
A runtime that changed since the run makes its measured step stale: the JSON's date says which code measured it.

The re-prediction with the recorded rates differs a little from the logged one where the profile differs (another
transformers version traces other operators: Mixtral's experts by up to 3%); the column says by how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import torch

import elixir
from elixir.hardware import Hardware
from elixir.hardware.record import _FORMAT_VERSION
from elixir.search import simulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fidelity as F  # noqa: E402

TARGET = 0.10


def recorded_hardware(path: str) -> Hardware:
    """The run's rates. A record of an older format version is read with the fields it has: what changed between
    versions is how a rate was timed, not what it means."""
    with open(path) as f:
        data = json.load(f)
    data["format_version"] = _FORMAT_VERSION
    return Hardware.from_json(json.dumps(data), source=path)


def scaled_fields(hw: Hardware, scales: list[str]) -> Hardware:
    changes = {}
    for item in scales:
        field, _, factor = item.partition("=")
        if not hasattr(hw, field) or not isinstance(getattr(hw, field), float) or not factor:
            raise SystemExit(f"--scale {item!r}: expected FIELD=FACTOR with a rate of the hardware record, "
                             "e.g. host_optim_elems_per_s=0.76")
        changes[field] = getattr(hw, field) * float(factor)
    return dataclasses.replace(hw, **changes)


def summary(ratios: list[float]) -> str:
    errors = [abs(r - 1) for r in ratios]
    return (f"median error {statistics.median(errors):.1%}, worst {max(errors):.1%}, "
            f"{sum(e <= TARGET + 1e-9 for e in errors)} of {len(errors)} within {TARGET:.0%}")


def offload(args, recorded: Hardware, changed: Hardware) -> int:
    """Stage (b)'s Elixir row of the run, predicted again (see the module's docstring)."""
    import gpubench as G

    with open(os.path.join(args.run, "offload-elixir.json")) as f:
        run = json.load(f)
    row, config = run["rows"][0], run["config"]
    point = G.search_plan(config["model"], False, recorded.with_memory(device_bytes=run["plan_cap_bytes"]).to_json(),
                          config["tokens_per_step"])
    if point.get("error") or point["summary"] != run["plan"]:
        print(f"the search did not find the recorded plan: {point.get('error') or point['summary']}")
        return 1
    plan = elixir.Plan.from_json(point["plan"])
    meta = G.offload_model(config["model"], "meta", dry_run=False)
    x = torch.zeros(plan.micro_batch_size, config["seq_len"], dtype=torch.long, device="meta")
    from elixir.models.checkpointing import checkpointing

    with checkpointing(meta, plan.checkpoint_every):
        prof = elixir.profile(meta, {"input_ids": x, "labels": x}, compute_dtype=torch.bfloat16)
    cap = run["plan_cap_bytes"]
    again = simulate(prof, plan, recorded.with_memory(device_bytes=cap))
    new = simulate(prof, plan, changed.with_memory(device_bytes=cap))
    m = row["step_s"]
    print(f"{args.run}: stage (b), {config['model']}, {config['tokens_per_step']} tokens per step, measured "
          f"{run['date_utc']}\n{run['plan']}")
    print(f"logged {row['predicted_step_s']:.3f} s, recorded rates {again.step_s:.3f} s, changed {new.step_s:.3f} s, "
          f"measured {m:.3f} s: {row['predicted_step_s'] / m:.2f} / {again.step_s / m:.2f} / {new.step_s / m:.2f}")
    for name, p in (("recorded", again), ("changed", new)):
        print(f"{name:9s}: compute {p.compute_s:.3f}, fetch waits {p.stall_s:.3f}, staging waits {p.optim_wait_s:.3f}, "
              f"worker {p.optim_in_backward_s:.3f}, after backward {p.optim_s:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "scale": args.scale, "logged_s": row["predicted_step_s"],
                       "recorded_s": again.step_s, "changed_s": new.step_s, "measured_s": m}, f, indent=1)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a folder with a run's fidelity.json and hardware.json")
    p.add_argument("--scale", action="append", default=[], metavar="FIELD=FACTOR",
                   help="multiply a rate of the recorded hardware for the second prediction (repeatable)")
    p.add_argument("--models", default=",".join(F.MODELS), help=f"comma-separated subset of {','.join(F.MODELS)}")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--offload", action="store_true", help="the run's offload stage (b) instead of its stage (d)")
    args = p.parse_args()
    recorded = recorded_hardware(os.path.join(args.run, "hardware.json"))
    changed = scaled_fields(recorded, args.scale)
    if args.offload:
        return offload(args, recorded, changed)
    with open(os.path.join(args.run, "fidelity.json")) as f:
        run = json.load(f)
    dry_run = bool(run.get("dry_run"))
    rows_per, seq = run["config"]["batch"]
    dtype = getattr(torch, run["config"]["dtype"].removeprefix("torch."))
    import transformers

    print(f"{args.run}: {run.get('date_utc', '?')}, {run.get('machine', {}).get('gpu', '?')}, torch "
          f"{run.get('machine', {}).get('torch', '?')}, transformers {run.get('machine', {}).get('transformers', '?')} "
          f"(here {transformers.__version__}); "
          f"changed: {', '.join(args.scale) or 'nothing'}")
    print(f"{'model':8s} {'plan':9s} {'logged':>8s} {'recorded':>9s} {'changed':>8s} {'measured':>9s}  ratios "
          "logged / recorded / changed (ms)")
    out = []
    for name in args.models.split(","):
        rows = [r for r in run["rows"] if r["model"] == name]
        if not rows:
            continue
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(F.config_of(name, dry_run)).train()
        x = torch.randint(0, base.config.vocab_size, (rows_per, seq))
        prof = elixir.profile(base, {"input_ids": x, "labels": x}, compute_dtype=dtype)
        scale = rows[0]["compute_scale"]
        plans, _ = F.plans_for(base, prof, recorded.with_compute_scale(scale), dtype)
        by_name = dict(plans)
        for r in rows:
            plan = by_name.get(r["plan"])
            if plan is None:
                print(f"{name:8s} {r['plan']:9s} not rebuilt here (the search found no plan)")
                continue
            again = simulate(prof, plan, recorded.with_compute_scale(scale)).step_s
            new = simulate(prof, plan, changed.with_compute_scale(scale)).step_s
            m = r["measured_s"]
            row = {"model": name, "plan": r["plan"], "logged_s": r["predicted_s"], "recorded_s": again,
                   "changed_s": new, "measured_s": m}
            out.append(row)
            print(f"{name:8s} {r['plan']:9s} {r['predicted_s'] * 1e3:8.1f} {again * 1e3:9.1f} {new * 1e3:8.1f} "
                  f"{m * 1e3:9.1f}  {r['predicted_s'] / m:.2f} / {again / m:.2f} / {new / m:.2f}", flush=True)
        del base, prof
    if not out:
        print("no rows")
        return 1
    for column in ("logged", "recorded", "changed"):
        print(f"{column:9s}: " + summary([r[f"{column}_s"] / r["measured_s"] for r in out]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "scale": args.scale, "rows": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
