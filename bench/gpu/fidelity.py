"""Stage (d) of the GPU benchmark: the planner's word on models it was not tuned on, as bench/bench_fidelity.py
measures it on the CPU.

Small Llama, GPT-NeoX, OPT, Qwen2 and Mixtral models built from configs (bench_fidelity.HF_MODELS, widened for
a GPU: width 1024, 8 layers; Mixtral 4 layers of 8 experts), bf16 compute with fp32 masters, batch 8 x 512,
fused AdamW, each under the plans of bench_fidelity: every chunk resident; on demand into a small cache; on
demand with homes on the host; and what `search()` returns when the device may hold 60% of the all-resident
plan's predicted device bytes. Every plan of a model is built in this process (the GPU's memory is large
enough for all of a model's plans at once), warmed up, then the plans alternate one step each for REPS
repetitions. Reported per plan: predicted and measured (median) step time and their ratio, predicted and
measured device model-data bytes; per stage: the median and worst step-time error. A model starts only when
the time box has room for it (its estimate: the previous model's time). Target (issue: the planner's word is
good): every step-time prediction within 10%, memory exact.
With --dry-run: the CPU's size of bench_fidelity's models (width 64, 2 layers), fp32, batch 2 x 32.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import statistics
import sys
import time

import gpubench as G
import torch

import elixir
from elixir.optim.overlap import UPDATE_PARTS
from elixir.plan import dtype_name
from elixir.search import PlanDoesNotFitError, search, simulate
from elixir.search.block import BlockInputs, compute_scale

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_fidelity import HF_MODELS  # noqa: E402

MODELS = ("llama", "neox", "opt", "qwen2", "mixtral")
GPU_SIZE = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "intermediate_size": 2816,
            "ffn_dim": 4096, "word_embed_proj_dim": 1024, "vocab_size": 32000}
MIXTRAL_SIZE = {"num_hidden_layers": 4, "num_local_experts": 8, "intermediate_size": 1408}
DRY_SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "ffn_dim": 256, "word_embed_proj_dim": 64, "vocab_size": 512}
BUDGET_FRACTION = 0.6
REPS = 9
"""Steps of each plan, taking turns. The H200 runs of BENCHMARKS.md had 5: a plan's steps spread by up to +-20%
around their median (Llama's resident 27.1-40.3 ms in one run), so that a median of 5 moved by several percent."""
WARMUP = 2
PHASED = 3
MiB = 2**20


def config_of(name: str, dry_run: bool):
    import transformers

    cls_name, kw = HF_MODELS[name]
    size = DRY_SIZE if dry_run else {**GPU_SIZE, **(MIXTRAL_SIZE if name == "mixtral" else {})}
    kw = {**kw, **{k: v for k, v in size.items() if k in kw}}
    if "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = max(1, kw["num_attention_heads"] // 2)
    return getattr(transformers, cls_name)(**kw)


def plans_for(base, prof, hw, dtype) -> tuple[list[tuple[str, elixir.Plan]], str | None]:
    """The plans of a model, and the searched one's device budget or why it is missing."""
    total = sum(p.numel() for p in base.parameters()) * dtype.itemsize / MiB
    largest = max(p.numel() for p in base.parameters()) * dtype.itemsize / MiB
    ondemand_mib = math.ceil(max(largest * 1.01, total / 12) * 100) / 100  # rounded up: it holds the largest

    def uniform(**kw) -> elixir.Plan:
        return elixir.Plan.uniform(base, compute_dtype=dtype, world_size=1,
                                   optimizer=torch.optim.AdamW(base.parameters()), **kw)

    plans = [
        ("resident", uniform(chunk_mib=max(32.0, ondemand_mib), resident=True)),
        ("ondemand", uniform(chunk_mib=ondemand_mib, cache_blocks=3, resident=False)),
        ("host", uniform(chunk_mib=ondemand_mib, cache_blocks=4, resident=False, param_home="host",
                         optim_home="host")),
    ]
    # the tight budget: BUDGET_FRACTION of the all-resident plan's predicted device peak or, where the
    # activations leave no plan under that, halfway between the host plan's peak and the all-resident one's
    resident, host = (simulate(prof, plans[i][1], hw).device_bytes_peak for i in (0, 2))
    failures = []
    for budget in (int(BUDGET_FRACTION * resident), (resident + host) // 2):
        try:
            searched, _ = search(prof, hw.with_memory(device_bytes=budget), world_size=1,
                                 compute_dtype=dtype_name(dtype))
        except PlanDoesNotFitError as e:
            failures.append(f"{budget / MiB:.0f} MiB: {str(e).splitlines()[0]}")
            continue
        plan = dataclasses.replace(searched, use_order=tuple(prof.use_sequence()))
        return plans + [("searched", plan)], f"searched under {budget / MiB:.0f} MiB"
    return plans, "no searched plan under " + "; ".join(failures)


def main() -> int:
    args = G.parser(__doc__.splitlines()[0], budget_s=90).parse_args()
    device = G.device_for(args)
    hw = G.hardware(args)
    G.freeze_gc()
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    rows_per, seq = (2, 32) if args.dry_run else (8, 512)
    result: dict = {"machine": G.machine(device), "hardware": hw.name, "rows": [], "skipped": {},
                    "config": {"batch": [rows_per, seq], "dtype": str(dtype), "reps": REPS}}
    stop = G.deadline(args)
    model_s = 0.0
    for name in MODELS:
        if time.perf_counter() + model_s > stop:
            result["skipped"][name] = f"time box: the last model took {model_s:.0f} s"
            continue
        started = time.perf_counter()
        import transformers

        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(config_of(name, args.dry_run)).train()
        x = torch.randint(0, base.config.vocab_size, (rows_per, seq))
        with BlockInputs(base) as block:
            prof = elixir.profile(base, {"input_ids": x, "labels": x}, compute_dtype=dtype)
        # the rates were measured on this machine by the run's first stage: time the model's first block on the
        # device, as elixir.plan does (elixir/search/block.py), and predict with its compute scale
        scaled = hw.with_compute_scale(compute_scale(block, dataclasses.replace(hw, measured_here=True),
                                                     compute_dtype=dtype, device=device))
        x = x.to(device)
        runs = []
        try:
            plans, searched = plans_for(base, prof, scaled, dtype)
            G.log(f"{name}: {searched}")
            if not searched.startswith("searched under"):
                result["skipped"][name] = searched
            for plan_name, plan in plans:
                model = copy.deepcopy(base)
                optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                model, optim = elixir.wrap(model, optim, plan=plan, device=device)
                runs.append({"plan": plan_name, "model": model, "optim": optim, "chunks": len(plan.chunks),
                             "host_updates": sum(c.optim_home != "device" for c in plan.chunks),
                             "pred": simulate(prof, plan, scaled), "rates": simulate(prof, plan, hw),
                             "step_s": []})
        except Exception as e:  # noqa: BLE001 - reported, the next model runs
            result["skipped"][name] = G.error_text(e)
            del runs
            gc.collect()
            G.free_device(device)
            continue

        def step(r, x=x) -> float:
            sync()
            t = time.perf_counter()
            r["model"](input_ids=x, labels=x).loss.backward()
            r["optim"].step()
            r["optim"].zero_grad()
            sync()
            return time.perf_counter() - t

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for r in runs:
            for _ in range(WARMUP):
                step(r)
        for r in runs:
            r["stats_before"] = elixir.step_stats(r["model"])
        order = list(runs)
        for _ in range(REPS):
            for r in order:
                r["step_s"].append(step(r))
            order = order[1:] + order[:1]
        for r in runs:  # the optimizer's own clocks over the timed steps, per step
            after = elixir.step_stats(r["model"])
            r["optimizer_s"] = {k: (after[k] - r["stats_before"][k]) / REPS
                                for k in ("update_s", "update_wait_s", "staging_wait_s", *UPDATE_PARTS)}
        # where the time goes: PHASED more steps of each plan, synchronized after forward, backward and the
        # optimizer step (which waits for the updates still running on the optimizer's worker), beside the
        # prediction's parts: the compute thread's operators, its waits for fetches and for the worker, the
        # optimizer's time after backward
        for r in runs:
            parts = []
            for _ in range(PHASED):
                sync()
                t0 = time.perf_counter()
                loss = r["model"](input_ids=x, labels=x).loss
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
                r["optim"].step()
                r["optim"].zero_grad()
                sync()
                parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            r["phases_s"] = [statistics.median(p) for p in zip(*parts)]
        for r in runs:
            measured = statistics.median(r["step_s"])
            stats = elixir.memory_stats(r["model"])
            row = {"model": name, "plan": r["plan"], "chunks": r["chunks"], "predicted_s": r["pred"].step_s,
                   "measured_s": measured, "time_ratio": r["pred"].step_s / measured, "step_s": r["step_s"],
                   "compute_scale": scaled.compute_scale, "rates_time_ratio": r["rates"].step_s / measured,
                   "predicted_device_bytes": r["pred"].model_device_bytes,
                   "measured_device_bytes": stats["device_bytes_peak"],
                   "memory_ratio": r["pred"].model_device_bytes / max(1, stats["device_bytes_peak"]),
                   "measured_phases_s": dict(zip(("forward", "backward", "optimizer"), r["phases_s"])),
                   "measured_optimizer_s": r["optimizer_s"],
                   "predicted_parts_s": {k: getattr(r["pred"], k) for k in (
                       "compute_s", "stall_s", "optim_wait_s", "optim_s", "optim_in_backward_s", "comm_busy_s")}}
            result["rows"].append(row)
            G.log(f"{name:8s} {r['plan']:9s} predicted {row['predicted_s'] * 1e3:8.1f} ms, measured "
                  f"{measured * 1e3:8.1f} ms ({row['time_ratio']:.2f}; rates alone {row['rates_time_ratio']:.2f}, "
                  f"block at {scaled.compute_scale:.2f}x); device model data "
                  f"{row['predicted_device_bytes'] / MiB:.1f} / {row['measured_device_bytes'] / MiB:.1f} MiB")
            pp, ph = row["predicted_parts_s"], row["measured_phases_s"]
            G.log(f"{'':18s} predicted: compute {pp['compute_s'] * 1e3:.1f}, fetch waits {pp['stall_s'] * 1e3:.1f}, "
                  f"worker waits {pp['optim_wait_s'] * 1e3:.1f}, after backward {pp['optim_s'] * 1e3:.1f} ms "
                  f"(worker busy {pp['optim_in_backward_s'] * 1e3:.1f}, copies {pp['comm_busy_s'] * 1e3:.1f}); "
                  f"measured apart: forward {ph['forward'] * 1e3:.1f}, backward {ph['backward'] * 1e3:.1f}, "
                  f"optimizer step {ph['optimizer'] * 1e3:.1f} ms")
            mo = {k: v * 1e3 for k, v in r["optimizer_s"].items()}
            G.log(f"{'':18s} measured per step: the updates inside backward took {mo['update_s']:.1f} ms (waiting "
                  f"{mo['update_wait_s']:.1f} for gradients; log {mo['update_log_s']:.1f}, check "
                  f"{mo['update_check_s']:.1f}, optimizer {mo['update_step_s']:.1f}, shard {mo['update_shard_s']:.1f} "
                  f"over {r['host_updates']} chunks on the host), backward waited {mo['staging_wait_s']:.1f} ms for "
                  f"staging buffers")
        del runs
        gc.collect()
        G.free_device(device)
        model_s = time.perf_counter() - started
        errors = [abs(r["time_ratio"] - 1) for r in result["rows"]]
        result["median_error"], result["worst_error"] = statistics.median(errors), max(errors)
        rates = [abs(r["rates_time_ratio"] - 1) for r in result["rows"]]
        result["rates_median_error"], result["rates_worst_error"] = statistics.median(rates), max(rates)
        G.write_json(args, "fidelity", result)
    if not result["rows"]:
        G.write_json(args, "fidelity", result)
        return 1
    within = sum(abs(r["time_ratio"] - 1) <= 0.1 for r in result["rows"])
    G.log(f"step time: median error {result['median_error']:.1%}, worst {result['worst_error']:.1%}, {within} of "
          f"{len(result['rows'])} plans within 10% (from the rates alone: {result['rates_median_error']:.1%}, "
          f"{result['rates_worst_error']:.1%}); skipped: {result['skipped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
