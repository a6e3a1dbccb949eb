"""The results of a comparison: medians per system, ratios to Elixir, and the Markdown table."""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

import elixir
from elixir.bench.meters import MemoryMeter
from elixir.bench.systems import SYSTEMS, System


def reference_of(s: System, systems: list[System]) -> System | None:
    """The Elixir system a system is compared with: Elixir of the same setting, else any Elixir."""
    elixirs = [o for o in systems if o.family == "elixir"]
    same = [o for o in elixirs if o.setting == s.setting]
    return (same or elixirs or [None])[0]


def losses_over_ranks(systems: list[System]) -> dict[str, list[float]]:
    out = {}
    for s in systems:
        t = torch.stack([v.float().reshape(()) for v in s.losses]).double().cpu()
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            t = t.cpu() / dist.get_world_size()
        out[s.name] = t.tolist()
    return out


def summarize(systems: list[System], *, steps: int, tokens_per_step: int, n_params: int, world: int,
              meters: dict[str, MemoryMeter], check_steps: int = 5) -> dict:
    """Rows (one per system, medians over repetitions) and the ratios to Elixir, computed per repetition."""
    losses = losses_over_ranks(systems)
    ref_name = next((s.name for s in systems if s.family == "pytorch"),
                    next((s.name for s in systems if s.family == "elixir"), systems[0].name))
    ref = losses[ref_name]

    def rel_diff(v: list[float], k: int) -> float:
        pairs = list(zip(v[:k], ref[:k]))
        return max((abs(a - b) / max(abs(b), 1e-12) for a, b in pairs), default=0.0)

    ratios = {}
    rows = []
    for s in systems:
        sec = statistics.median(s.seconds) / steps
        tps = statistics.median(s.tokens_per_s)
        row = {
            "system": s.name, "setting": s.setting, "description": s.description, "note": s.note,
            "tokens_per_s": tps, "tokens_per_s_per_rep": s.tokens_per_s, "seconds_per_rep": s.seconds,
            "step_s": sec, "tflops_per_rank": 6 * n_params * tokens_per_step / world / sec / 1e12,
            "memory": {k: {"peak_bytes": s.retained.get(k, 0) + s.transient.get(k, 0),
                           "retained_bytes": s.retained.get(k, 0), "step_added_bytes": s.transient.get(k, 0),
                           "source": m.source}
                       for k, m in meters.items()},
            "loss_rel_diff_first_steps": rel_diff(losses[s.name], check_steps),
            "loss_rel_diff_all_steps": rel_diff(losses[s.name], len(ref)),
        }
        other = reference_of(s, systems)
        if other is not None:
            per_rep = [a / b for a, b in zip(s.tokens_per_s, other.tokens_per_s)]
            q = {"vs": other.name, "per_rep": per_rep, "median": statistics.median(per_rep),
                 "min": min(per_rep), "max": max(per_rep)}
            row["speed_vs_elixir"] = q
            if s is not other:
                ratios[f"{s.name}/{other.name}"] = q
            mem = {}
            for k in meters:
                mine, theirs = row["memory"][k]["peak_bytes"], other.retained.get(k, 0) + other.transient.get(k, 0)
                mem[k] = mine / theirs if theirs else None
            row["memory_vs_elixir"] = mem
        if s.family == "elixir":
            st = elixir.memory_stats(s.model)
            row["elixir_counters"] = {k: st[k] for k in ("device_bytes_peak", "host_bytes_peak", "num_chunks",
                                                         "cache_blocks", "gathers")}
            row["predicted"] = s.predicted
            row["predicted_step_s"] = s.predicted.get("step_s")
        rows.append(row)
    return {"rows": rows, "ratios": ratios, "losses": losses, "loss_reference": ref_name}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(summary: dict, skipped: dict[str, str] | None = None, reps: int | None = None) -> str:
    """The results as a Markdown table, with a legend naming where each figure comes from."""
    rows = summary["rows"]
    if not rows:
        return "no system ran"
    meter_keys = list(rows[0]["memory"])
    labels = {"device": "peak device MiB", "host": "peak host MiB", "ram": "peak RAM MiB"}
    head = ["setting", "system", "tokens/s", "TFLOPS/rank", "ms/step", "predicted ms/step",
            "tokens/s ÷ Elixir's" + (f" (median, min-max over {reps} rep(s))" if reps else "")]
    head += [labels[k] for k in meter_keys] + [f"{labels[k].split(' MiB')[0]} ÷ Elixir's" for k in meter_keys]
    head += ["Elixir counters: device/host MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        q = r.get("speed_vs_elixir")
        speed = "-" if q is None else f"{q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})"
        pred = r.get("predicted_step_s")
        cells = [r["setting"], r["system"], f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_rank']:.3g}",
                 f"{r['step_s'] * 1e3:,.0f}", "-" if pred is None else f"{pred * 1e3:,.0f}", speed]
        cells += [_mib(r["memory"][k]["peak_bytes"]) for k in meter_keys]
        cells += [_x((r.get("memory_vs_elixir") or {}).get(k)) for k in meter_keys]
        c = r.get("elixir_counters")
        cells.append("-" if c is None else f"{_mib(c['device_bytes_peak'])}/{_mib(c['host_bytes_peak'])}")
        lines.append("| " + " | ".join(cells) + " |")
    for name, why in (skipped or {}).items():
        setting = SYSTEMS[name][0] if name in SYSTEMS else ""
        lines.append(f"| {setting} | {name} | not run: {why} |" + " |" * (len(head) - 3))
    sources = {k: rows[0]["memory"][k]["source"] for k in meter_keys}
    legend = [
        "TFLOPS/rank = 6 x parameters x tokens / step time / ranks; ratios are computed per repetition, "
        "then the median.",
        "Peak memory per rank = what the system kept after being built and warmed up + the most its steps "
        "added, by " + ", ".join(f"{labels[k].split(' MiB')[0].removeprefix('peak ')}: {src} delta"
                                 for k, src in sources.items())
        + ("; device and host are the same RAM on this machine" if "ram" in sources else "")
        + ("; RSS deltas are approximate (free pages are handed back to the system before each reading, "
           "pages still held are counted)" if any(src == "RSS" for src in sources.values()) else "") + ".",
        "Elixir counters: model data (parameters, gradients, optimizer states; no activations) at peak, as "
        "elixir.memory_stats counts it; predicted ms/step: the plan's plan.predicted['step_s'].",
    ]
    return "\n".join(lines + [""] + legend)
