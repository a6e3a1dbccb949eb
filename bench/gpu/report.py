"""Stage (c) and the end of the GPU benchmark: one short table from the stages' JSON files in --out.

Reads parity.json, fits.json, offload-elixir.json and offload-fsdp2-offload.json (whichever exist: a stage
that crashed or ran out of its time box is reported as missing), prints the summary table and writes it,
with the figures behind it, to summary.json. (c) compares the planner's predictions for Elixir in (a) and
(b) (plan.predicted: step time, peak device memory, model data per tier) with what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GiB = 2**30


def load(out: str, name: str) -> dict | None:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def row_of(stage: dict | None, system: str) -> dict | None:
    if not stage:
        return None
    return next((r for r in stage.get("rows", []) if r["system"] == system), None)


def gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def tf(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def why_missing(stage: dict | None, system: str) -> str:
    if stage is None:
        return "stage missing (crashed or ran out of its time box; see its .log)"
    reason = (stage.get("skipped") or {}).get(system)
    return f"not run: {reason}" if reason else "not run"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./gpu-out")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    parity, fits = load(args.out, "parity"), load(args.out, "fits")
    off_e, off_f = load(args.out, "offload-elixir"), load(args.out, "offload-fsdp2-offload")
    rows: list[tuple[str, str, str]] = []
    figures: dict = {}

    # (0) parity
    if parity is None:
        rows.append(("0 parity", "Elixir's losses vs PyTorch's", "stage missing (see parity.log)"))
    else:
        for c in parity["checks"]:
            diffs = c["max_rel_diff"]
            shown = " / ".join(f"{diffs[k]:.1e}" if k in diffs else "failed"
                               for k in ("elixir", "elixir-offload", "elixir-ondemand"))
            verdict = "OK" if c["ok"] else "MISMATCH" + (f" ({'; '.join(c['errors'].values())})" if c["errors"] else "")
            rows.append((f"0 parity {c['dtype']}", f"{c['model']}, {c['steps']} steps: largest relative loss "
                         "difference to PyTorch (searched plan / optimizer on host / all on demand)",
                         f"{shown}, tolerance {c['rtol']:g}: {verdict}"))

    # (a) fits
    pt, amp, ex = row_of(fits, "pytorch"), row_of(fits, "pytorch-amp"), row_of(fits, "elixir")
    a_label = "a fits"
    if fits:
        cfg = fits["config"]
        a_label = f"a {cfg['model']} bf16 {cfg['batch_size']}x{cfg['seq_len']}"
    if pt and ex:
        q = pt["speed_vs_elixir"]  # pytorch / elixir per rep
        per_rep = [1 / v for v in q["per_rep"]]
        ratio = sorted(per_rep)[len(per_rep) // 2] if len(per_rep) % 2 else sum(sorted(per_rep)[
            len(per_rep) // 2 - 1: len(per_rep) // 2 + 1]) / 2
        figures["a_elixir_over_pytorch"] = ratio
        amp_text = ""
        if amp:
            figures["a_elixir_over_pytorch_amp"] = ex["tflops_per_rank"] / amp["tflops_per_rank"]
            amp_text = f" / {tf(amp['tflops_per_rank'])}"
        rows.append((a_label, "TFLOPS per GPU: PyTorch eager" + (" / PyTorch AMP" if amp else "") + " / Elixir",
                     f"{tf(pt['tflops_per_rank'])}{amp_text} / {tf(ex['tflops_per_rank'])}"))
        rows.append((a_label, "Elixir ÷ PyTorch eager (median over reps)" + (", ÷ AMP" if amp else ""),
                     f"{ratio:.2f}x ({min(per_rep):.2f}-{max(per_rep):.2f})"
                     + (f", {figures['a_elixir_over_pytorch_amp']:.2f}x" if amp else "")))
    else:
        missing = "pytorch" if not pt else "elixir"
        rows.append((a_label, "PyTorch eager vs Elixir", why_missing(fits, missing)))

    # (b) offload
    eo, fo = row_of(off_e, "elixir"), row_of(off_f, "fsdp2-offload")
    b_label = "b offload"
    if off_e or off_f:
        cfg = (off_e or off_f)["config"]
        b_label = (f"b {cfg['model']} bf16 {cfg['batch_size']}x{cfg['seq_len']}, "
                   f"{gib(cfg['model_data_bytes'])} model data, cap {gib(cfg['cap_bytes'])}")
    if eo:
        frac = f"{eo['tflops_per_rank'] / pt['tflops_per_rank']:.2f} of (a)'s PyTorch" if pt else "(a) missing"
        rows.append((b_label, "Elixir TFLOPS per GPU; fraction of (a)'s PyTorch eager rate",
                     f"{tf(eo['tflops_per_rank'])}; {frac}"))
        if pt:
            figures["b_elixir_fraction_of_a_pytorch"] = eo["tflops_per_rank"] / pt["tflops_per_rank"]
        replans = [a for a in (off_e.get("attempts") or []) if a.get("error")]
        if replans:
            rows.append((b_label, "Elixir plans that ran out of memory before one ran",
                         "; ".join(f"plan for {a['plan_for_bytes'] / GiB:.1f} GiB: {a['error']}" for a in replans)))
    else:
        rows.append((b_label, "Elixir with offload", why_missing(off_e, "elixir")))
    if fo:
        ratio = f"{eo['tokens_per_s'] / fo['tokens_per_s']:.2f}x" if eo else "-"
        if eo:
            figures["b_elixir_over_fsdp2_offload"] = eo["tokens_per_s"] / fo["tokens_per_s"]
        rows.append((b_label, "FSDP2 + CPU offload TFLOPS per GPU; Elixir ÷ FSDP2 (medians, separate runs)",
                     f"{tf(fo['tflops_per_rank'])}; {ratio}"))
    else:
        rows.append((b_label, "FSDP2 + CPU offload", why_missing(off_f, "fsdp2-offload")))

    # (c) predicted vs measured
    for tag, r in (("(a)", ex), ("(b)", eo)):
        if not r or not r.get("predicted"):
            continue
        pred, mem = r["predicted"], r["memory"]
        dev = mem.get("device") or mem.get("ram")
        host = mem.get("host")
        counters = r.get("elixir_counters") or {}
        rows.append((f"c {tag} Elixir", "step time: predicted / measured (median)",
                     f"{pred['step_s']:.3f} s / {r['step_s']:.3f} s (measured = {r['step_s'] / pred['step_s']:.2f}x)"))
        rows.append((f"c {tag} Elixir", f"peak device memory: predicted / measured ({dev['source']} delta)",
                     f"{gib(pred['device_bytes_peak'])} / {gib(dev['peak_bytes'])}"))
        rows.append((f"c {tag} Elixir", "model data device / host: predicted / counted (elixir.memory_stats)",
                     f"{gib(pred['model_device_bytes'])} / {gib(pred['model_host_bytes'])} predicted; "
                     f"{gib(counters.get('device_bytes_peak'))} / {gib(counters.get('host_bytes_peak'))} counted"))
        if host:
            rows.append((f"c {tag} Elixir", "peak host memory: predicted / measured (RSS delta)",
                         f"{gib(pred['host_bytes_peak'])} / {gib(host['peak_bytes'])}"))
        figures[f"c_{tag.strip('()')}_step_measured_over_predicted"] = r["step_s"] / pred["step_s"]

    machine = (fits or off_e or parity or {}).get("machine", {})
    title = (f"Elixir GPU benchmark summary: {machine.get('gpu', machine.get('device', '?'))}, torch "
             f"{machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}"
             + (" (DRY RUN: tiny models on the CPU)" if args.dry_run else ""))
    print()
    print(title)
    print()
    print("| stage | measure | result |")
    print("|---|---|---|")
    for stage, what, result in rows:
        print(f"| {stage} | {what} | {result} |")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"title": title, "rows": rows, "figures": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
