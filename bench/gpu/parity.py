"""Stage 0 of the GPU benchmark: Elixir's losses match plain PyTorch's, step by step, in fp32 and bf16.

Two small models (the GPT "small" preset and OPT-125M; a tiny GPT and a shrunk OPT with --dry-run), one
batch of random tokens, the same AdamW, 5 steps each under:
  pytorch          fp32: the model and AdamW; bf16: a bf16 copy computes, fp32 masters are updated
                   (the same math as Elixir's compute_dtype=bf16)
  pytorch-amp      bf16 only: fp32 weights under torch.autocast (other rounding; shown, not checked)
  elixir           the plan elixir.plan searches for this machine
  elixir-offload   that plan with every optimizer on the host, updated inside backward
  elixir-ondemand  every chunk gathered on demand from shards on the host, optimizer on the host
  elixir-offload-after  elixir-offload with every update after backward (no update inside it)
Checked: the largest relative loss difference to pytorch, against 1e-4 (fp32) and 1e-2 (bf16); elixir-offload
and elixir-offload-after alike to the bit (the updates inside backward, whose host chunks' gradients are
checked and logged on the device on their way down, against the step after backward); and, in bf16, that a
non-finite gradient found on the device skips the step under nonfinite="skip" and changes no parameter, and that
elixir-offload inside and after backward also agree over steps of 2 micro-batches with a clip (every loss, norm
and parameter; the later micro-batch added on the worker) and, with one micro-batch, in their clip's norms (to
fp32 rounding: the device takes them on the copy down).
"""

from __future__ import annotations

import gc
import math
import sys
from functools import partial

import gpubench as G
import torch

import elixir
from elixir import bench as B

STEPS = 5
RTOL = {"fp32": 1e-4, "bf16": 1e-2}


def ondemand_plan(model, dtype, optimizer):
    biggest = max(p.numel() for p in model.parameters()) * dtype.itemsize / 2**20
    return elixir.Plan.uniform(model, chunk_mib=math.ceil(biggest * 1024) / 1024, cache_blocks=4, resident=False,
                               param_home="host", optim_home="host", compute_dtype=dtype, optimizer=optimizer)


def build_ondemand(base, device, dtype) -> B.System:
    import copy

    m = copy.deepcopy(base).train()
    opt = B.adamw(m.parameters())
    plan = ondemand_plan(m, dtype, opt)
    m, opt = elixir.wrap(m, opt, plan=plan, device=device)
    return B.System("elixir-ondemand", m, opt, B.plain_step(m, opt), f"{len(plan.chunks)} chunks on demand",
                    setting=B.OFFLOAD, family="elixir", description="Elixir, every chunk on demand from the host")


def offload_plan(base, device, dtype, x, hw, *, overlap: bool):
    """elixir-offload's plan (the searched one with every optimizer on the host), with or without updates inside
    backward."""
    import copy
    import dataclasses

    m = copy.deepcopy(base).train()
    plan = elixir.plan(m, {"input_ids": x, "labels": x}, hardware=hw, compute_dtype=dtype)
    return dataclasses.replace(B.optimizer_on_host(plan), overlap=overlap)


def build_offload(base, device, dtype, x, hw, *, overlap: bool) -> B.System:
    s = B.build_elixir(base, device, dtype, None, None, plan=offload_plan(base, device, dtype, x, hw, overlap=overlap))
    s.name = "elixir-offload" if overlap else "elixir-offload-after"
    return s


def nonfinite_skipped(base, device, dtype, x, hw) -> str | None:
    """None when a step whose loss is inf (every gradient non-finite) is skipped and counted, and leaves every
    parameter as it was, with the updates inside backward; else what went wrong."""
    import copy

    m = copy.deepcopy(base).train()
    opt = B.adamw(m.parameters())
    m, opt = elixir.wrap(m, opt, plan=offload_plan(base, device, dtype, x, hw, overlap=True), device=device,
                         nonfinite="skip")
    for scale in (1.0, math.inf):
        before = elixir.full_state_dict(m)
        opt.backward(m(input_ids=x, labels=x).loss * scale)
        opt.step()
        opt.zero_grad()
    stats = elixir.step_stats(m)
    after = elixir.full_state_dict(m)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if stats["nonfinite_steps"] != 1 or stats["speculated_steps"] < 1 or changed:
        return (f"nonfinite_steps {stats['nonfinite_steps']}, speculated_steps {stats['speculated_steps']}, "
                f"changed {changed[:3]}")
    return None


def micro_batches_alike(base, device, dtype, x, hw) -> str | None:
    """None when elixir-offload's plan trains alike with and without updates inside backward over steps of 2
    micro-batches, clipped by a norm that never acts: the later micro-batch's host gradients added on the
    optimizer's worker against the main thread (on a GPU), every norm, loss and parameter to the bit; and, with
    one micro-batch, when the norms the device takes on the copy down agree with the host's to fp32 rounding;
    else what differed."""
    import copy
    import dataclasses

    runs = {}
    searched = offload_plan(base, device, dtype, x, hw, overlap=True)
    for accum in (2, 1):
        for overlap in (True, False):
            m = copy.deepcopy(base).train()
            opt = B.adamw(m.parameters())
            m, opt = elixir.wrap(m, opt, plan=dataclasses.replace(searched, overlap=overlap, grad_accum=accum),
                                 device=device)
            losses, norms = [], []
            for _ in range(3):
                total = 0.0
                for part in x.chunk(accum):
                    loss = m(input_ids=part, labels=part).loss / accum
                    opt.backward(loss)
                    total += loss.item()
                norms.append(float(opt.clip_grad_norm_(1e6)))
                opt.step()
                opt.zero_grad()
                losses.append(total)
            runs[accum, overlap] = (losses, norms, elixir.full_state_dict(m), elixir.step_stats(m))
    (lo, no, po, so), (la, na, pa, _) = runs[2, True], runs[2, False]
    wrong = [n for n in po if not torch.equal(po[n], pa[n])]
    if lo != la or no != na or wrong:
        return f"2 micro-batches: losses {lo} / {la}, norms {no} / {na}, parameters differ: {wrong[:3]}"
    if device.type == "cuda" and not so["accumulate_s"] > 0:
        return "2 micro-batches: the worker added nothing (accumulate_s 0)"
    (lo, no, po, _), (la, na, pa, _) = runs[1, True], runs[1, False]
    if lo != la or any(abs(a - b) > 1e-5 * abs(b) for a, b in zip(no, na)):
        return f"1 micro-batch, clipped: losses {lo} / {la}, norms {no} / {na}"
    return None


def main() -> int:
    args = G.parser(__doc__.splitlines()[0], budget_s=90).parse_args()
    device = G.device_for(args)
    hw = G.hardware(args)  # measured here, first of all stages, and kept for the others
    G.freeze_gc()
    results: dict = {"machine": G.machine(device), "hardware": hw.name, "checks": []}
    ok = True
    for model_name in ("gpt", "opt"):
        for dtype_name in ("fp32", "bf16"):
            dtype = B.DTYPES[dtype_name]
            if model_name == "gpt":
                base = B.build_model("tiny" if args.dry_run else "small", device=device)
                vocab, (rows, seq) = base.config.vocab_size, ((2, 32) if args.dry_run else (8, 256))
                label = "GPT tiny" if args.dry_run else "GPT small"
            else:
                base = G.family_model("opt-125m", device, dry_run=args.dry_run)
                vocab, (rows, seq) = G.vocab_of(base), ((2, 32) if args.dry_run else (4, 256))
                label = "OPT (shrunk)" if args.dry_run else "OPT-125M"
            x = B.make_batch(rows, seq, vocab).to(device)
            builders = {"pytorch": partial(B.build_pytorch, base, device, dtype)}
            if dtype != torch.float32:
                builders["pytorch-amp"] = partial(B.build_pytorch, base, device, dtype, amp=True)
            builders["elixir"] = partial(B.build_elixir, base, device, dtype, x, hw)
            builders["elixir-offload"] = partial(build_offload, base, device, dtype, x, hw, overlap=True)
            builders["elixir-ondemand"] = partial(build_ondemand, base, device, dtype)
            builders["elixir-offload-after"] = partial(build_offload, base, device, dtype, x, hw, overlap=False)
            losses, errors = {}, {}
            for name, build in builders.items():
                try:
                    s = build()
                    for _ in range(STEPS):
                        s.step(x)
                    losses[name] = [float(v) for v in s.losses]
                except Exception as e:  # noqa: BLE001 - reported in the table
                    errors[name] = G.error_text(e)
                    G.log(f"{label} {dtype_name} {name}: FAILED {errors[name]}")
                s = None
                gc.collect()
            ref = losses.get("pytorch")
            diffs = {}
            if ref:
                for name, v in losses.items():
                    if name != "pytorch":
                        diffs[name] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(v, ref))
            checked = {k: v for k, v in diffs.items() if k != "pytorch-amp"}
            same = losses.get("elixir-offload") == losses.get("elixir-offload-after")
            if not same:
                errors["elixir-offload"] = "losses differ from elixir-offload-after's (updates after backward)"
            if dtype != torch.float32:
                for key, check, what, fine in (
                        ("nonfinite", nonfinite_skipped, "a non-finite step under nonfinite='skip'", "skipped, OK"),
                        ("micro-batches", micro_batches_alike,
                         "elixir-offload inside / after backward, 2 micro-batches and a clip", "identical, OK")):
                    try:
                        wrong = check(base, device, dtype, x, hw)
                    except Exception as e:  # noqa: BLE001 - reported
                        wrong = G.error_text(e)
                    if wrong:
                        errors[key] = wrong
                    G.log(f"{label} {dtype_name}: {what}: {wrong or fine}")
            passed = bool(ref) and not errors and all(v <= RTOL[dtype_name] for v in checked.values())
            ok &= passed
            results["checks"].append({"model": label, "dtype": dtype_name, "batch": [rows, seq], "steps": STEPS,
                                      "losses": losses, "max_rel_diff": diffs, "rtol": RTOL[dtype_name],
                                      "errors": errors, "ok": passed})
            G.log(f"{label} {dtype_name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                  + f"; offload inside / after backward {'identical' if same else 'DIFFER'}"
                  + f" -> {'OK' if passed else 'MISMATCH'} (tolerance {RTOL[dtype_name]:g}; pytorch-amp not checked)")
            del base, builders
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            G.write_json(args, "parity", results | {"ok": ok})
    G.log(f"parity {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
