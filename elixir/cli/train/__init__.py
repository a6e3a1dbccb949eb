"""Train a model: a reference GPT preset on the embedded corpus, or a Hugging Face model on your data.

With no flags this is the default job: the "small" GPT (~3.3M parameters) for 400 steps of 8 x 128
byte tokens (about one pass over CPython's documentation text, the embedded corpus), AdamW with warmup
and cosine decay, under the plan the planner finds for this machine. `--model FOLDER` fine-tunes a
Hugging Face model with its own tokenizer on `--data` (text, chats, instructions or token ids); the hand
flags of a uniform plan (`--on-demand`, `--param-home`, ...) override the planner.

`train` is three steps, one module each: `check_args` (flags.py, prepare.py) rejects bad flag values
before anything is built, `build` (prepare.py) makes the data, model, plan and optimizer, and `loop`
(below) trains, reading top to bottom; metrics.py holds what it reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections import deque
from typing import TextIO

import torch
import torch.distributed as dist

import elixir
from elixir import accel, comm
from elixir.checkpoint.weights import HF_FILES
from elixir.cli.train.flags import CONFIG_FILE, add_arguments, layer_defaults, resolved_config
from elixir.cli.train.metrics import Progress, Reporters, clock, memory_fields
from elixir.cli.train.prepare import (
    JOB_FLAGS,
    Job,
    build,
    check_args,
    hf_files,
    layout_line,
    lr_factor,
    shard_layout,
)
from elixir.preempt import EXIT_PREEMPTED, Preemption

__all__ = ["Job", "add_arguments", "build", "check_args", "evaluate", "layer_defaults", "loop", "lr_factor", "run",
           "save_checkpoint", "train"]

FINAL_LOSS_STEPS = 10
"""The final train loss is the mean over this many last steps: one step's loss is noisy."""
WARMUP_STEPS = 1
"""Steps before the step time is measured (the first one builds caches and warms the allocator)."""
MEASURED_STEPS = 5
"""Steps whose median time is shown next to the predicted step."""
PREDICTION_SLACK = 1.25
"""Measured over predicted step time (or its inverse) beyond which `elixir train` warns."""


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def _mean_over_ranks(value: torch.Tensor) -> float:
    return _sum_over_ranks(value).item() / comm.rank_and_world()[1]


@torch.no_grad()
def evaluate(job: Job, args: argparse.Namespace) -> float:
    """Mean validation loss per trained token over `--eval-batches` fixed batches and all ranks (each
    rank's loss is a mean over its own trained tokens: weighed by their count, the result does not
    depend on how many ranks share the batches)."""
    job.model.eval()
    batches = job.data.val()
    sums = torch.zeros(2, dtype=torch.float64, device=job.device)  # (loss x tokens, tokens)
    for _ in range(args.eval_batches):
        batch = next(batches)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        if tokens:  # a batch with nothing trained has a NaN mean
            loss = job.model(**_to(batch, job.device)).loss.double()
            sums += torch.stack([loss * tokens, torch.tensor(float(tokens), dtype=torch.float64, device=job.device)])
    job.model.train()
    loss_sum, tokens = _sum_over_ranks(sums).tolist()
    return loss_sum / tokens if tokens else math.nan


def train(args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """Run the job that `args` describes; returns the final losses and throughput:
    {"train_loss", "val_loss", "tokens_per_s", "steps", "elapsed_s", "skipped_steps", "step_s",
    "predicted_step_s", "shard_over" (the plan's layout: world, node or mixed), "nodes", ...}. Prints to
    `out` (default stdout) on rank 0 unless `args.quiet`."""
    check_args(args)
    job = build(args)
    return loop(job, args, out)


def _trained_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    """Labels a step trains on, over all ranks: the model shifts labels, so a row's first never counts."""
    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    return int(_sum_over_ranks(torch.tensor(local, dtype=torch.float64)).item())


def loop(job: Job, args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """The training loop of `train`, on a built job."""
    out = sys.stdout if out is None else out
    is_main = job.rank == 0
    progress = Progress(args.steps, out, enabled=is_main and not args.quiet)
    config = resolved_config(args)
    reporters = Reporters(out_dir=args.out, report_to=tuple(args.report_to), config=config, enabled=is_main)
    if args.out is not None and is_main:
        with open(os.path.join(args.out, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)
    progress.line(job.plan.summary())
    if job.world_size > 1:
        progress.line(layout_line(job.plan, getattr(args, "shard_over", "auto")))
    progress.line(
        f"model {args.model}: {job.num_params:,} parameters, {args.dtype}, {job.world_size} rank(s) on "
        f"{job.device.type}; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens"
        + (f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
    )
    progress.line(job.data.description)
    pred = job.prediction
    if pred:
        progress.line(
            f"predicted step {1e3 * pred['step_s']:.1f} ms on {getattr(job.hardware, 'name', 'this machine')}: "
            f"compute {1e3 * pred['compute_s']:.1f} ms, waiting for chunks {1e3 * pred['stall_s']:.1f} ms, "
            f"optimizer after backward {1e3 * pred['optim_s']:.1f} ms"
            + (f"; the model's operators at {pred['compute_scale']:.2f}x the calibration's rates (one block timed)"
               if pred.get("compute_scale", 1.0) != 1.0 else "")
        )
    progress.line("memory: model data as elixir.memory_stats counts it, MiB now/peak")

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum  # over all ranks
    flops_per_step = job.flops_per_micro_batch * args.grad_accum  # one rank's
    peak_flops = job.hardware.matmul_flops.get(job.plan.compute_dtype)  # None: no figure, no MFU
    # per-step losses, for the final train loss (a resumed run starts with the saved ones)
    recent = deque([t.to(job.device) for t in job.recent_losses], maxlen=FINAL_LOSS_STEPS)
    job.recent = recent
    window_loss = torch.zeros((), device=job.device)  # sum of step losses since the last record
    window_norm = torch.zeros((), device=job.device)
    val_loss = math.nan
    start = window_start = time.perf_counter()
    wait_at_window = elixir.memory_stats(job.model)["fetch_wait_s"]  # chunk waits before this window
    train_s = 0.0
    window_steps = 0
    measured_step_s = None
    measure_from = job.start_step + WARMUP_STEPS
    measure_to = min(args.steps, measure_from + MEASURED_STEPS)
    t_measure = 0.0
    step_times: list[float] = []
    if job.start_step:
        progress.line(f"resumed from {args.resume} at step {job.start_step}")
    saved_at = job.start_step
    with Preemption() as stop:  # [Note: preemption]: SIGTERM, SIGINT or SIGUSR1 stop the run after a step
        for step in range(job.start_step + 1, args.steps + 1):
            micro_batches = [next(job.data.train) for _ in range(args.grad_accum)]
            # With masked labels each rank's mean would weigh its tokens by its own count: the loss is the
            # sum over this rank's trained tokens divided by the step's count over all ranks (times the
            # ranks, whose gradients are averaged), so it is the mean over the step's trained tokens for
            # any number of ranks and micro-batches.
            items = _trained_tokens(micro_batches) / job.world_size if job.count_items else None
            step_loss = torch.zeros((), device=job.device)
            for batch in micro_batches:
                if items is not None:
                    loss = job.model(**_to(batch, job.device), num_items_in_batch=max(items, 1e-9)).loss
                else:
                    loss = job.model(**_to(batch, job.device)).loss / args.grad_accum
                job.optim.backward(loss)  # scales the loss in fp16, a plain backward otherwise
                step_loss += loss.detach()
            if args.clip > 0:
                window_norm += job.optim.clip_grad_norm_(args.clip).detach().float()
            lr = job.optim.param_groups[0]["lr"]
            job.optim.step()
            job.optim.zero_grad()
            job.scheduler.step()
            recent.append(step_loss)
            window_loss += step_loss
            window_steps += 1

            if measure_from <= step <= measure_to and measure_to > measure_from:
                accel.synchronize(job.device)
                now = time.perf_counter()
                if step > measure_from:
                    step_times.append(now - t_measure)
                t_measure = now
                if step == measure_to:  # the median: one slow step (the allocator growing, the machine) is not it
                    measured_step_s = statistics.median(step_times)
                    progress.line(
                        f"step time after {WARMUP_STEPS} warm-up step(s): measured {1e3 * measured_step_s:.1f} ms "
                        f"(median of {len(step_times)})"
                        + (f", predicted {1e3 * pred['step_s']:.1f} ms" if pred else "")
                    )
                    off = measured_step_s / pred["step_s"] if pred and pred.get("step_s") else 1.0
                    if not 1 / PREDICTION_SLACK <= off <= PREDICTION_SLACK:
                        progress.line(
                            f"warning: the measured step is {off:.2f}x the predicted one; the plan was searched "
                            "with rates that do not match this run (a busy machine, or a calibration of another "
                            "setup): `elixir plan --calibrate` measures this machine again"
                        )
            last = step == args.steps
            if step % args.log_every == 0 or last:  # every rank: the record's figures are all-reduced
                loss_mean = _mean_over_ranks(window_loss) / window_steps  # .item() waits: the time is true
                now = time.perf_counter()
                window_s = now - window_start
                train_s += window_s
                tflops = flops_per_step * window_steps / window_s / 1e12
                waited = elixir.memory_stats(job.model)["fetch_wait_s"]
                chunk_wait_s, wait_at_window = (waited - wait_at_window) / window_steps, waited
                record = {
                    "step": step, "loss": loss_mean, "lr": lr,
                    "grad_norm": window_norm.item() / window_steps if args.clip > 0 else None,
                    "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step * window_steps / window_s,
                    "window_steps": window_steps, "window_s": window_s, "step_s": window_s / window_steps,
                    "chunk_wait_s": chunk_wait_s,
                    "flops_per_step": flops_per_step, "tflops": tflops, "peak_flops": peak_flops,
                    "mfu": tflops * 1e12 / peak_flops if peak_flops else None,
                    "predicted_step_s": pred.get("step_s"), "predicted_compute_s": pred.get("compute_s"),
                    "predicted_stall_s": pred.get("stall_s"),
                    **memory_fields(job.model, job.device), "elapsed_s": now - start,
                }
                reporters.record(record)
                progress.record(record)
                window_loss.zero_()
                window_norm.zero_()
                window_steps, window_start = 0, time.perf_counter()
            else:
                progress.tick(step)
            if args.out is not None and (last or (args.save_every and step % args.save_every == 0)):
                save_checkpoint(job, args)
                saved_at = step
            if (args.eval_every and step % args.eval_every == 0) or last:
                t, waited = time.perf_counter(), elixir.memory_stats(job.model)["fetch_wait_s"]
                val_loss = evaluate(job, args)
                wait_at_window += elixir.memory_stats(job.model)["fetch_wait_s"] - waited  # not training either
                progress.line(f"step {step:>{len(str(args.steps))}}/{args.steps}: val loss {val_loss:.4f}")
                reporters.record({"step": step, "val_loss": val_loss})
                # The window restarts after an evaluation, so its time is not counted as training.
                if window_steps == 0:
                    window_start = time.perf_counter()
                else:
                    window_start += time.perf_counter() - t
            if job.on_step is not None:
                job.on_step(step)
            if not last and stop.requested():  # every rank, at the same step
                if args.out is not None and saved_at != step:
                    save_checkpoint(job, args)
                    saved_at = step
                break
    if window_steps:  # stopped inside a record's window: its time counts too
        train_s += time.perf_counter() - window_start
    steps_done = step - job.start_step
    preempted = stop.signal_name if step < args.steps else None

    train_loss = _mean_over_ranks(torch.stack(list(recent)).mean())
    elapsed_s = time.perf_counter() - start
    stats = elixir.step_stats(job.model)
    result = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": steps_done * tokens_per_step / train_s,
        "steps": step,
        "preempted": preempted,
        "saved": saved_at == step and args.out is not None,
        "elapsed_s": elapsed_s,
        "skipped_steps": job.optim.skipped_steps,
        "nonfinite_steps": job.optim.nonfinite_steps,
        "speculated_steps": stats["speculated_steps"],
        "rollbacks": stats["rollbacks"],
        "step_s": measured_step_s,
        "predicted_step_s": pred.get("step_s"),
        "shard_over": shard_layout(job.plan),
        "nodes": job.plan.nodes,
    }
    if stats["speculated_steps"]:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(stats["rollback_reasons"].items()))
        progress.line(
            f"optimizer inside backward in {stats['speculated_steps']} of {steps_done} steps, "
            f"{stats['rollbacks']} rolled back" + (f" ({reasons})" if reasons else "")
        )
    if preempted:
        progress.line(
            f"stopped after step {step} of {args.steps} on {preempted}: "
            + (f"saved to {os.path.join(args.out, 'last')}; run the same command with --resume {args.out} to go on"
               if args.out is not None else "nothing saved (no --out)")
        )
    progress.line(
        f"done: train loss {train_loss:.4f} (mean of the last {len(recent)} steps), val loss {val_loss:.4f}, "
        f"{result['tokens_per_s']:,.0f} tokens/s, {clock(elapsed_s)} elapsed"
        + (f", {overflow} steps skipped on fp16 overflow" if (overflow := job.optim.skipped_steps
                                                               - job.optim.nonfinite_steps) else "")
        + (f", {job.optim.nonfinite_steps} steps skipped on non-finite gradients" if job.optim.nonfinite_steps
           else "")
    )
    reporters.close()
    return result


def save_checkpoint(job: Job, args: argparse.Namespace) -> None:
    """`--out DIR`: the run so far to DIR/last, with what a resumed run needs to continue exactly (the
    data position among it) and the resolved config; with `--keep-last K`, also DIR/step-NNNNNNN."""
    extra = {
        "job": {k: getattr(args, k) for k in JOB_FLAGS}, "batches": job.data.train.state_dict(),
        "recent_losses": _recent_losses_of_every_rank(job), "config": resolved_config(args),
        HF_FILES: hf_files(job, args),  # what `elixir export` writes beside the weights
    }
    last = os.path.join(args.out, "last")
    elixir.save(job.model, job.optim, last, extra=extra, scheduler=job.scheduler)
    if args.keep_last and job.rank == 0:
        _keep_step_copy(args.out, last, job.optim.steps, args.keep_last)


def _recent_losses_of_every_rank(job: Job) -> list[list[torch.Tensor]]:
    """The last steps' losses of each rank (rank 0 alone writes `extra`, and the final train loss is
    their mean over ranks)."""
    mine = torch.stack([t.detach().float() for t in job.recent]) if job.recent else torch.zeros(0)
    if not dist.is_initialized():
        return [[t.cpu() for t in mine]]
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [[t.cpu() for t in losses] for losses in every]


def _keep_step_copy(out: str, last: str, step: int, keep: int) -> None:
    """DIR/step-NNNNNNN as hard links of DIR/last's files (a save writes new files and renames them, never
    into old ones, so links stay intact), then all but the newest `keep` such folders removed."""
    target = os.path.join(out, f"step-{step:07d}")
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last, tmp, copy_function=_link_or_copy)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    steps = sorted(n for n in os.listdir(out) if n.startswith("step-") and n[5:].isdigit())
    for name in steps[:-keep]:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _set_threads() -> None:
    """All cores for one process; several ranks on one machine share them (they fight otherwise).
    An explicit OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, cores // max(1, local_ranks)))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`elixir train`: bad values end in `parser.error` (exit status 2) before training starts."""
    try:
        check_args(args)
        # under torchrun: join the process group (gloo on CPU, nccl on GPUs); the data is split by
        # rank so that N ranks see the same global batch as one
        elixir.init_distributed(timeout_s=args.timeout)
        _set_threads()
        job = build(args)
    except ValueError as e:
        parser.error(str(e))
    if job.finished:
        if job.rank == 0:
            print(f"{args.resume} is at step {job.start_step} of --steps {args.steps} already: nothing to train")
        elixir.runtime_of(job.model).close()
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    try:
        result = loop(job, args)
    except elixir.NonFiniteError as e:  # every rank alike: the flag is all-reduced
        print(f"elixir train: error: {e}", file=sys.stderr)
        elixir.runtime_of(job.model).close()
        if dist.is_initialized():
            dist.destroy_process_group()
        return 1
    elixir.runtime_of(job.model).close()  # the disk tier's scratch file, if any, goes now
    if args.json and job.rank == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if dist.is_initialized():
        dist.barrier()  # ranks leave together
        dist.destroy_process_group()
    if result["preempted"]:  # resumable when saved; otherwise as if the signal had ended it
        return EXIT_PREEMPTED if result["saved"] else 128 + signal.Signals[result["preempted"]].value
    return 0
