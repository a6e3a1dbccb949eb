"""The end of the GPU benchmark: one short table from the stages' JSON files in --out.

Reads parity.json, checkpoint.json, plans.json, offload-{pytorch,fsdp2-offload,elixir}.json, curve.json,
fidelity.json and host-adamw.json (whichever exist: a stage that crashed or ran out of its time box is reported
as missing), prints the summary table and writes it, with the figures behind it, to summary.json. Ratios of
throughput between the offload stage's systems are of medians measured in separate processes (one system each:
they cannot share the GPU's memory); the TFLOPS are model FLOPs, 6 x params x tokens / step time, the same
work for every system.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GiB = 2**30
SYSTEMS = {"pytorch": "PyTorch", "fsdp2-offload": "FSDP2-offload", "elixir": "Elixir"}


def load(out: str, name: str) -> dict | None:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def tf(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def count(v) -> str:
    return "-" if v is None else f"{v:g}"


def why_missing(stage: dict | None, name: str) -> str:
    if stage is None:
        return f"stage missing (crashed or ran out of its time box; see {name}.log)"
    errors = [a["error"] for a in stage.get("attempts", []) if a.get("error")]
    return "not run: " + ("; ".join(errors) if errors else "see its .log")


def checkpointing(every: int) -> str:
    return {0: "none", 1: "every block"}.get(every, f"every {every} blocks")


def batch(config: dict) -> str:
    return (f"{config['micro_batch_size']}x{config['grad_accum']}, {checkpointing(config['checkpoint_every'])}"
            if "micro_batch_size" in config else "-")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./gpu-out")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    parity, ckpt, plans, curve = (load(args.out, n) for n in ("parity", "checkpoint", "plans", "curve"))
    stages = {s: load(args.out, f"offload-{s}") for s in SYSTEMS}
    rows_of = {s: (st or {}).get("rows", [None])[0] for s, st in stages.items()}
    rows: list[tuple[str, str, str]] = []
    figures: dict = {}

    # (0) parity: one row per dtype, both models
    if parity is None:
        rows.append(("0 parity", "Elixir's losses vs PyTorch's", "stage missing (see parity.log)"))
    else:
        for dtype in ("fp32", "bf16"):
            checks = [c for c in parity["checks"] if c["dtype"] == dtype]
            shown = "; ".join(f"{c['model']} " + " / ".join(
                f"{c['max_rel_diff'][k]:.1e}" if k in c["max_rel_diff"] else "failed"
                for k in ("elixir", "elixir-offload", "elixir-ondemand")) for c in checks)
            bad = [c for c in checks if not c["ok"]]
            verdict = "OK" if checks and not bad else "MISMATCH " + "; ".join(
                e for c in bad for e in c["errors"].values())
            rtol = checks[0]["rtol"] if checks else "-"
            rows.append((f"0 parity {dtype}", "5 steps: largest relative loss difference to PyTorch (searched plan / "
                         "optimizer on host / all on demand)", f"{shown}; tolerance {rtol}: {verdict}"))
    if ckpt is None:
        rows.append(("0b checkpoint", "resume bit for bit", "stage missing (see checkpoint.log)"))
    else:
        rows.append(("0b checkpoint", "GPT, chunks on demand from host shards: resumed losses identical; save / "
                     "load", "; ".join(f"{c['dtype']} {'identical' if c['identical'] else 'DIFFER'}, "
                                       f"{c['save_s']:.2f} / {c['load_s']:.2f} s" for c in ckpt["checks"])))

    # (b) the offload stage
    config = next((st["config"] for st in stages.values() if st), None)
    label = "b offload"
    if config:
        label = (f"b {config['model']} bf16 {config['sequences']}x{config['seq_len']} tokens/step, cap "
                 f"{gib(config['cap_bytes'])}")
    pt, fs, ex = rows_of["pytorch"], rows_of["fsdp2-offload"], rows_of["elixir"]
    shown = [tf(r["tflops_per_rank"]) if r else why_missing(stages[s], f"offload-{s}") for s, r in rows_of.items()]
    rows.append((label, "TFLOPS (6 x params x tokens / step): PyTorch, whole GPU / FSDP2-offload, cap / Elixir, cap",
                 " / ".join(shown)))
    if ex and (pt or fs):
        parts = []
        if pt:
            figures["b_elixir_over_pytorch"] = ex["tokens_per_s"] / pt["tokens_per_s"]
            parts.append(f"{figures['b_elixir_over_pytorch']:.2f}x PyTorch (target 0.90)")
        if fs:
            figures["b_elixir_over_fsdp2_offload"] = ex["tokens_per_s"] / fs["tokens_per_s"]
            parts.append(f"{figures['b_elixir_over_fsdp2_offload']:.2f}x FSDP2-offload (target 2)")
        rows.append((label, "Elixir's throughput (medians of separate processes)", "; ".join(parts)))
    rows.append((label, "micro-batch x accumulation, checkpointing: PyTorch / FSDP2 / Elixir",
                 " / ".join(batch(st["config"]) if st else "-" for st in stages.values())))
    if ex and ex.get("predicted_step_s"):
        ratio = ex["step_s"] / ex["predicted_step_s"]
        figures["b_elixir_step_measured_over_predicted"] = ratio
        rows.append((label, "Elixir's step: predicted / measured (target: within 15%)",
                     f"{ex['predicted_step_s']:.3f} / {ex['step_s']:.3f} s (measured {ratio:.2f}x)"))
    device = [f"{gib(r['memory']['device']['peak_bytes'])} ({gib(r.get('max_memory_reserved_bytes'))})"
              if r and "device" in r["memory"] else "-" for r in rows_of.values()]
    if any(d != "-" for d in device):
        rows.append((label, "peak device memory allocated (reserved): PyTorch / FSDP2 / Elixir", " / ".join(device)))
    host = [f"{r['host_bytes_per_param']:.1f}" if r else "-" for r in rows_of.values()]
    if ex:
        figures["b_elixir_host_bytes_per_param"] = ex["host_bytes_per_param"]
        host[-1] += f" (counted {ex['elixir_host_bytes_per_param']:.1f})"
    rows.append((label, "host bytes per parameter, RSS added by the system: PyTorch / FSDP2 / Elixir (Elixir's "
                 "count: elixir.memory_stats; target 12 plus bounded pools)", " / ".join(host)))
    rows.append((label, "first step: loss, grad norm: PyTorch / FSDP2 / Elixir (same model and batch)",
                 " / ".join(f"{r['losses'][0]:.4f}, {r['grad_norms'][0]:.3g}" if r else "-" for r in rows_of.values())))
    if ex:
        timed, reasons = ex["timed_step_stats"], ex["timed_rollback_reasons"]
        why = ", ".join(f"{k} {v}" for k, v in reasons.items() if v)
        norms = ex["grad_norms"][-timed["steps"]:] if timed["steps"] else []
        rows.append((label, "Elixir's timed steps rolled back (clip to norm 1.0; grad norms of those steps)",
                     f"{timed['rollbacks']} of {timed['steps']}" + (f" ({why})" if why else "")
                     + (f"; norms {min(norms):.3g}-{max(norms):.3g}" if norms else "")))
    allocs = []
    for r in rows_of.values():
        c = (r or {}).get("per_step_counters") or {}
        text = f"{count(c.get('cuda.num_device_alloc'))}/{count(c.get('cuda_host.num_host_alloc'))}"
        if "elixir.allocations" in c:
            text += f"/{count(c['elixir.allocations'])} ({count(c['elixir.pinned_allocations'])})"
        allocs.append(text if r else "-")
    rows.append((label, "allocations per timed step: cudaMalloc / pinned host blocks [/ Elixir's tracker (pinned)]: "
                 "PyTorch / FSDP2 / Elixir", " / ".join(allocs)))

    # (c) the curve, with the offload stage's 64k point
    points = [] if curve is None else [(p["tokens_per_step"], p, p["row"]) for p in curve["points"]]
    if ex:
        points.append((ex["tokens_per_step"], stages["elixir"]["config"], ex))
    for tokens, point, r in sorted(points, key=lambda t: t[0]):
        ratio = r["step_s"] / r["predicted_step_s"]
        figures[f"c_{tokens}_measured_over_predicted"] = ratio
        figures[f"c_{tokens}_tflops"] = r["tflops_per_rank"]
        rows.append((f"c curve {tokens:,} tokens/step", "micro-batch x accumulation, checkpointing; step predicted / "
                     "measured; TFLOPS; rollbacks",
                     f"{batch(point)}; {r['predicted_step_s']:.3f} / {r['step_s']:.3f} s ({ratio:.2f}x); "
                     f"{tf(r['tflops_per_rank'])}; {r['timed_step_stats']['rollbacks']} of "
                     f"{r['timed_step_stats']['steps']}"))
    if curve is None:
        rows.append(("c curve", "Elixir over global batches", "stage missing (see curve.log)"))
    for tokens, why in (curve or {}).get("skipped", {}).items():
        rows.append((f"c curve {int(tokens):,} tokens/step", "not measured", why))
    # (d) the planner's fidelity on small Hugging Face families
    fidelity = load(args.out, "fidelity")
    if fidelity and fidelity.get("rows"):
        worst = max(fidelity["rows"], key=lambda r: abs(r["time_ratio"] - 1))
        exact = sum(r["predicted_device_bytes"] == r["measured_device_bytes"] for r in fidelity["rows"])
        figures["d_median_error"], figures["d_worst_error"] = fidelity["median_error"], fidelity["worst_error"]
        rows.append(("d fidelity", "step predicted / measured over plans: median and worst error; device bytes "
                     "exact", f"{fidelity['median_error']:.1%}, {fidelity['worst_error']:.1%} ({worst['model']} "
                     f"{worst['plan']}: {worst['time_ratio']:.2f}) over {len(fidelity['rows'])} plans; "
                     f"{exact} of {len(fidelity['rows'])} exact"
                     + (f"; from the rates alone {fidelity['rates_median_error']:.1%}, "
                        f"{fidelity['rates_worst_error']:.1%}" if "rates_median_error" in fidelity else "")
                     + (f"; skipped: {', '.join(fidelity['skipped'])}" if fidelity.get("skipped") else "")))
    else:
        rows.append(("d fidelity", "the planner's word on small HF models", why_missing(fidelity, "fidelity")))
    # (e) the host's AdamW under what a step adds
    host = load(args.out, "host-adamw")
    if host and host.get("rows"):
        rates = "; ".join(f"{r['condition']} {r['elems_per_s'] / 1e9:.2f}" for r in host["rows"]
                          if r["threads"] == host["threads"])
        rows.append(("e host AdamW", f"G elements/s on {host['numel']:,} elements, {host['threads']} threads",
                     rates))
    else:
        rows.append(("e host AdamW", "the host's AdamW under what a step adds", why_missing(host, "host-adamw")))
    if plans:
        took = [p["plan_s"] for p in plans["points"]]
        rows.append(("plans", "the planner's searches for (b) and (c), in parallel beside the GPU stages",
                     f"{len(took)} plans, {min(took):.1f}-{max(took):.1f} s each" if took else "none finished"))

    machine = next((st["machine"] for st in (*stages.values(), parity, ckpt) if st and "machine" in st), {})
    title = (f"Elixir GPU benchmark summary: {machine.get('gpu', machine.get('device', '?'))}, torch "
             f"{machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}"
             + (" (DRY RUN: tiny models on the CPU)" if args.dry_run else ""))
    print()
    print(title)
    print()
    print("| stage | measure | result |")
    print("|---|---|---|")
    previous = None
    for stage, what, result in rows:
        print(f"| {stage if stage != previous else stage.split()[0]} | {what} | {result} |")  # b's setup once
        previous = stage
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"title": title, "rows": rows, "figures": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
