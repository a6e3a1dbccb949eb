"""Train a reference GPT preset on the embedded corpus (or on text files) under a uniform plan.

With no flags this is the default job: the "small" GPT (~3.3M parameters) for 400 steps of
8 x 128 tokens (about one pass over CPython's documentation text, the embedded corpus), AdamW
with warmup and cosine decay, every chunk resident. The flags of the uniform plan (`--on-demand`,
`--param-home`, `--optim-home`, ...) move model data between device memory, host memory and the
block cache without changing anything else in the loop.

`train` is three steps: `check_args` rejects bad flag values before anything is built, `build`
makes the data, model, plan and optimizer, and `loop` trains, reading top to bottom.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.distributed as dist

import elixir
from elixir import accel
from elixir.data import TokenBatches, load_corpus, load_text, split
from elixir.models import GPT, GPTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HOMES = ("device", "host")
MIN_CHUNK_MIB = 32.0
"""Default chunk size when the largest parameter fits in it (the library's default)."""
DEFAULT_SEQ_LEN = 128
FINAL_LOSS_STEPS = 10
"""The final train loss is the mean over this many last steps: one step's loss is noisy."""


def _int_at_least(minimum: int, flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer; use {flag} N with N >= {minimum}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; use {flag} N with N >= {minimum}")
        return value

    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; use {flag} X with X > 0") from None
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"{text} must be finite and above 0; use {flag} X with X > 0")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `elixir train`."""
    presets = GPTConfig.preset_names()
    job = p.add_argument_group("job")
    job.add_argument(
        "--model", default="small", metavar="NAME_OR_PATH",
        help=f"a GPT preset ({', '.join(presets)}; default: small, ~3.3M parameters), or a Hugging Face "
        "folder (config.json and safetensors weights) to fine-tune: built on the meta device and loaded "
        "chunk by chunk with elixir.load_pretrained",
    )
    job.add_argument(
        "--steps", type=_int_at_least(1, "--steps"), metavar="N", default=400, help="optimizer steps (default: 400)"
    )
    job.add_argument(
        "--batch-size", type=_int_at_least(1, "--batch-size"), metavar="N", default=8,
        help="sequences per micro-batch, over all ranks (default: 8)",
    )
    job.add_argument(
        "--seq-len", type=_int_at_least(2, "--seq-len"), metavar="N", default=None,
        help=f"tokens (bytes) per sequence (default: {DEFAULT_SEQ_LEN}, or the preset's block size)",
    )
    job.add_argument(
        "--grad-accum", type=_int_at_least(1, "--grad-accum"), metavar="N", default=1,
        help="micro-batches per optimizer step (default: 1)",
    )
    job.add_argument(
        "--lr", type=_positive_float("--lr"), metavar="X", default=3e-3,
        help="peak learning rate of AdamW; linear warmup, then cosine decay to 10%% (default: 3e-3)",
    )
    job.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="compute dtype (default: fp32)")
    job.add_argument(
        "--data", metavar="PATH", default=None,
        help="a text file, or a folder of text files, to train on (default: the embedded corpus)",
    )
    job.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the init and the batches (default: 0)")
    job.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing: blocks recompute in backward"
    )
    moe = p.add_argument_group("Mixture-of-Experts (GPT presets)")
    moe.add_argument(
        "--experts", type=_int_at_least(0, "--experts"), metavar="E", default=0,
        help="experts of every block's feed-forward layer, dropless top-k routing (default: 0, dense)",
    )
    moe.add_argument(
        "--top-k", type=_int_at_least(1, "--top-k"), metavar="K", default=2,
        help="experts per token, at most --experts (default: 2)",
    )
    moe.add_argument(
        "--ep-size", type=_int_at_least(1, "--ep-size"), metavar="N", default=1,
        help="expert parallel: each group of N ranks splits the experts, tokens travel by all-to-all; "
        "N divides --experts and the number of ranks (default: 1, every rank holds every expert)",
    )

    plan = p.add_argument_group("plan (the same choices for every chunk)")
    plan.add_argument(
        "--chunk-mib", type=_positive_float("--chunk-mib"), metavar="MIB", default=None,
        help=f"chunk (and cache block) size in MiB (default: {MIN_CHUNK_MIB:g}, or the largest parameter's)",
    )
    plan.add_argument(
        "--cache-blocks", type=_int_at_least(1, "--cache-blocks"), metavar="N", default=4,
        help="device cache blocks for on-demand chunks (default: 4)",
    )
    where = plan.add_mutually_exclusive_group()
    where.add_argument(
        "--resident", dest="resident", action="store_true", default=True,
        help="keep every chunk gathered on the device for the whole step (default)",
    )
    where.add_argument(
        "--on-demand", dest="resident", action="store_false",
        help="gather chunks into the device cache only when used",
    )
    plan.add_argument(
        "--param-home", default="device", choices=HOMES,
        help="where each rank's parameter shard lives between uses; host needs --on-demand (default: device)",
    )
    plan.add_argument(
        "--optim-home", default="device", choices=(*HOMES, "disk"),
        help="where fp32 masters and optimizer states live and update; disk needs --disk (default: device)",
    )
    plan.add_argument(
        "--disk", metavar="DIR", default=None,
        help="scratch folder for masters and optimizer states on disk (--optim-home disk): one preallocated file "
        "per rank, deleted at the end of the run",
    )
    plan.add_argument(
        "--prefetch-depth", type=_int_at_least(0, "--prefetch-depth"), metavar="N", default=2,
        help="on-demand chunks fetched ahead of use (default: 2)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--log-every", type=_int_at_least(1, "--log-every"), metavar="N", default=20,
        help="steps between progress lines when stdout is not a terminal (default: 20)",
    )
    out.add_argument(
        "--eval-every", type=_int_at_least(0, "--eval-every"), metavar="N", default=100,
        help="steps between validation losses, 0 for only the final one (default: 100)",
    )
    out.add_argument(
        "--eval-batches", type=_int_at_least(1, "--eval-batches"), metavar="N", default=4,
        help="validation batches per evaluation (default: 4)",
    )
    out.add_argument("--quiet", action="store_true", help="print nothing")
    out.add_argument("--json", metavar="PATH", help="write the final losses and throughput as JSON (rank 0)")

    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument(
        "--out", metavar="DIR", default=None,
        help="save checkpoints to DIR/last (replaced atomically), every --save-every steps and at the end",
    )
    ckpt.add_argument(
        "--save-every", type=_int_at_least(1, "--save-every"), metavar="N", default=None,
        help="steps between checkpoints (needs --out; default: only at the end)",
    )
    ckpt.add_argument(
        "--resume", metavar="DIR", default=None,
        help="continue from a checkpoint (a folder written by --out, or DIR/last): same model and data "
        "flags; any number of ranks and any plan; --steps is the total to reach",
    )

    ranks = p.add_argument_group("several ranks (launch with torchrun --nproc-per-node N)")
    ranks.add_argument(
        "--timeout", type=_positive_float("--timeout"), metavar="SECONDS", default=600.0,
        help="how long a collective waits for the other ranks before failing with a named error (default: 600)",
    )


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag, the value and the fix, for combinations that no single flag's
    parser can reject; fills in the defaults that depend on the preset. Builds nothing."""
    block_size = _block_size(args.model)
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, block_size)
    if args.seq_len > block_size:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the block size {block_size} of --model {args.model}; "
            f"use --seq-len {block_size} or less"
        )
    if args.param_home == "host" and args.resident:
        raise ValueError(
            "--param-home host: resident chunks stay gathered on the device, so their shards cannot live "
            "on host; add --on-demand"
        )
    if args.optim_home == "disk" and args.disk is None:
        raise ValueError("--optim-home disk keeps masters and optimizer states in a scratch file: add --disk DIR")
    if args.disk is not None and args.optim_home != "disk":
        raise ValueError(f"--disk {args.disk!r} is for --optim-home disk; add it, or leave --disk out")
    if args.save_every is not None and args.out is None:
        raise ValueError(f"--save-every {args.save_every} needs --out DIR to say where checkpoints go")
    if args.resume is not None:
        from elixir.checkpoint.store import MANIFEST

        if os.path.isdir(os.path.join(args.resume, "last")) and not os.path.isfile(
            os.path.join(args.resume, MANIFEST)
        ):
            args.resume = os.path.join(args.resume, "last")
        if not os.path.isfile(os.path.join(args.resume, MANIFEST)) and not os.path.isfile(
            os.path.join(args.resume + ".old", MANIFEST)
        ):
            raise ValueError(
                f"--resume {args.resume!r} is not a checkpoint (no {MANIFEST}); pass a folder that --out wrote"
            )
    if args.data is not None and not os.path.exists(args.data):
        raise ValueError(f"--data {args.data!r} does not exist; pass a text file or a folder of text files")
    _check_moe_args(args)


def _check_moe_args(args: argparse.Namespace) -> None:
    if args.experts and _is_hf_folder(args.model):
        raise ValueError(f"--experts {args.experts}: a Hugging Face --model brings its own experts; leave it out")
    experts = args.experts or (_hf_experts(args.model) if _is_hf_folder(args.model) else 0)
    if args.ep_size > 1 and not experts:
        raise ValueError(
            f"--ep-size {args.ep_size} spreads experts over ranks: it needs a GPT preset with --experts E, or a "
            "Hugging Face Mixture-of-Experts model"
        )
    if args.experts and args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k} exceeds --experts {args.experts}; use --top-k {args.experts} or less")
    if experts:
        from elixir.parallel import check_expert_parallel

        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        try:
            check_expert_parallel(experts, args.ep_size, world)
        except ValueError as e:
            raise ValueError(f"--ep-size {args.ep_size} with {experts} experts: {e}") from None


def _hf_experts(model: str) -> int:
    """Experts per MoE layer of a Hugging Face config.json (0 for a dense model)."""
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    return 0


def _is_hf_folder(model: str) -> bool:
    return os.path.isfile(os.path.join(model, "config.json"))


def _block_size(model: str) -> int:
    """The longest sequence `--model` takes; ValueError naming the choices for an unknown name."""
    if model in GPTConfig.preset_names():
        return GPTConfig.preset(model).block_size
    if _is_hf_folder(model):
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        vocab = config.get("vocab_size", 0)
        if vocab < 256:
            raise ValueError(
                f"--model {model!r}: vocab_size {vocab} is below 256, but the data are bytes (ids 0-255); "
                "use a model whose vocabulary has at least 256 tokens"
            )
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if key in config:
                return int(config[key])
        return 2**31 - 1
    raise ValueError(
        f"--model {model!r} is neither a preset ({', '.join(GPTConfig.preset_names())}) nor a folder with a "
        "config.json; pass a preset name or a Hugging Face model folder"
    )


def _build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """The model (a reference GPT, or a Hugging Face model built on the meta device) and its size."""
    if not _is_hf_folder(args.model):
        moe = dict(n_experts=args.experts, top_k=args.top_k) if args.experts else {}
        model = GPT(GPTConfig.preset(args.model, **moe))
        if args.checkpointing:
            model.gradient_checkpointing_enable()
        return model, model.num_params()
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"--model {args.model!r} is a Hugging Face folder, which needs transformers: pip install 'elixir-train[hf]'"
        ) from None

    config = transformers.AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), sum(p.numel() for p in model.parameters())


@dataclass
class Job:
    """Everything the loop needs, built by `build`."""

    model: torch.nn.Module
    optim: elixir.ElixirOptimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: elixir.Plan
    train_batches: TokenBatches
    val_data: bytes
    device: torch.device
    num_params: int
    rank: int
    world_size: int
    start_step: int = 0  # optimizer steps already taken (a resumed run)
    recent_losses: list = field(default_factory=list)  # the last steps' losses before the start (a resumed run)
    recent: deque | None = None  # the last steps' losses while the loop runs (checkpoints keep them)


def lr_factor(step: int, steps: int) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based): linear warmup
    over the first tenth of the run (at most 100 steps), then cosine decay to 10%."""
    warmup = max(1, min(100, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build(args: argparse.Namespace) -> Job:
    """Data, model, optimizer, plan, wrap and schedule. Raises ValueError for values that only the
    data or the model can show wrong (text too short, chunks too small, ...)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    data = load_text(args.data) if args.data is not None else load_corpus()
    train_data, val_data = split(data)
    if len(val_data) < args.seq_len + 1:
        raise ValueError(
            f"--data {args.data!r}: its validation part (the last 5%) has {len(val_data)} bytes, fewer than "
            f"--seq-len + 1 = {args.seq_len + 1}; use a shorter --seq-len or more text"
        )
    train_batches = TokenBatches(
        train_data, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
        rank=rank, world_size=world_size,
    )

    torch.manual_seed(args.seed)
    model, num_params = _build_model(args)
    if args.ep_size > 1:  # every rank keeps its experts only, before the plan is made
        elixir.parallel.expert_parallel(model, args.ep_size)
    # Weight decay on matrices (and embeddings) only, as in GPT-2; biases and norms keep theirs.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=True,
    )
    dtype = DTYPES[args.dtype]
    chunk_mib = args.chunk_mib
    if chunk_mib is None:
        biggest_mib = max(p.numel() for p in model.parameters()) * dtype.itemsize / 2**20
        chunk_mib = max(MIN_CHUNK_MIB, math.ceil(biggest_mib))
    plan = elixir.Plan.uniform(
        model, chunk_mib=chunk_mib, cache_blocks=args.cache_blocks, resident=args.resident,
        param_home=args.param_home, optim_home=args.optim_home, compute_dtype=dtype,
        prefetch_depth=args.prefetch_depth, optimizer=optim,
    )
    device = accel.default_device()
    model, optim = elixir.wrap(model, optim, plan=plan, device=device, disk=args.disk)
    if _is_hf_folder(args.model) and args.resume is None:
        elixir.load_pretrained(model, args.model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: lr_factor(step, args.steps))
    start_step, recent_losses = 0, []
    if args.resume is not None:
        extra = elixir.load(model, optim, args.resume, scheduler=scheduler)
        saved = (extra or {}).get("job", {})
        for key in ("model", "batch_size", "seq_len", "seed", "grad_accum", "data"):
            if key in saved and saved[key] != getattr(args, key):
                raise ValueError(
                    f"--resume {args.resume!r} was saved with --{key.replace('_', '-')} {saved[key]}, this run has "
                    f"{getattr(args, key)}; resume with the same model and data flags"
                )
        start_step = optim.steps
        if start_step >= args.steps:
            raise ValueError(f"--resume {args.resume!r} is at step {start_step}; use --steps above it to train on")
        train_batches.load_state_dict(extra["batches"])
        recent_losses = list(extra.get("recent_losses", []))
    return Job(
        model, optim, scheduler, plan, train_batches, val_data, device, num_params, rank, world_size, start_step,
        recent_losses,
    )


def _val_batches(val_data: bytes, args: argparse.Namespace, rank: int, world_size: int) -> TokenBatches:
    # A fresh stream with a fixed seed each time: every evaluation sees the same batches.
    return TokenBatches(
        val_data, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed + 1,
        rank=rank, world_size=world_size,
    )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


@torch.no_grad()
def evaluate(job: Job, args: argparse.Namespace) -> float:
    """Mean validation loss over `--eval-batches` fixed batches, averaged over ranks."""
    job.model.eval()
    batches = _val_batches(job.val_data, args, job.rank, job.world_size)
    total = torch.zeros((), device=job.device)
    for _ in range(args.eval_batches):
        total += job.model(**_to(next(batches), job.device)).loss.float()
    job.model.train()
    return _mean_over_ranks(total / args.eval_batches)


def train(args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """Run the job that `args` describes; returns the final losses and throughput:
    {"train_loss", "val_loss", "tokens_per_s", "steps", "elapsed_s", "skipped_steps"}.
    Prints to `out` (default stdout) on rank 0 unless `args.quiet`."""
    check_args(args)
    job = build(args)
    return loop(job, args, out)


def loop(job: Job, args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """The training loop of `train`, on a built job."""
    out = sys.stdout if out is None else out
    progress = Progress(args.steps, out, enabled=job.rank == 0 and not args.quiet, log_every=args.log_every)
    progress.line(job.plan.summary())
    progress.line(
        f"model {args.model}: {job.num_params:,} parameters, {args.dtype}, {job.world_size} rank(s) on "
        f"{job.device.type}; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens"
        + (f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
    )
    progress.line("memory: model data as elixir.memory_stats counts it, MiB now/peak")
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    # per-step losses, for the final train loss (a resumed run starts with the saved ones)
    recent = deque([t.to(job.device) for t in job.recent_losses], maxlen=FINAL_LOSS_STEPS)
    job.recent = recent
    window_loss = torch.zeros((), device=job.device)  # sum of step losses since the last progress line
    val_loss = math.nan
    start = window_start = time.perf_counter()
    train_s = 0.0
    window_steps = 0
    if job.start_step:
        progress.line(f"resumed from {args.resume} at step {job.start_step}")
    for step in range(job.start_step + 1, args.steps + 1):
        step_loss = torch.zeros((), device=job.device)
        for _ in range(args.grad_accum):
            loss = job.model(**_to(next(job.train_batches), job.device)).loss / args.grad_accum
            job.optim.backward(loss)  # scales the loss in fp16, a plain backward otherwise
            step_loss += loss.detach()
        job.optim.clip_grad_norm_(1.0)
        job.optim.step()
        job.optim.zero_grad()
        job.scheduler.step()
        recent.append(step_loss)
        window_loss += step_loss
        window_steps += 1

        last = step == args.steps
        if progress.due(step) or last:
            # The loss shown is this rank's; .item() waits for the device, so the time is true.
            shown_loss = window_loss.item() / window_steps
            now = time.perf_counter()
            window_s = now - window_start
            train_s += window_s
            stats = elixir.memory_stats(job.model)
            progress.update(
                step, loss=shown_loss, tokens_per_s=window_steps * tokens_per_step / window_s,
                device_mib=stats["device_bytes"] / 2**20, device_peak_mib=stats["device_bytes_peak"] / 2**20,
                host_mib=stats["host_bytes"] / 2**20, host_peak_mib=stats["host_bytes_peak"] / 2**20,
                elapsed_s=now - start,
            )
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if args.out is not None and (last or (args.save_every and step % args.save_every == 0)):
            save_checkpoint(job, args)
        if (args.eval_every and step % args.eval_every == 0) or last:
            t = time.perf_counter()
            val_loss = evaluate(job, args)
            progress.line(f"step {step:>{len(str(args.steps))}}/{args.steps}: val loss {val_loss:.4f}")
            # The window restarts after an evaluation, so its time is not counted as training.
            if window_steps == 0:
                window_start = time.perf_counter()
            else:
                window_start += time.perf_counter() - t

    train_loss = _mean_over_ranks(torch.stack(list(recent)).mean())
    elapsed_s = time.perf_counter() - start
    stats = elixir.step_stats(job.model)
    result = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": (args.steps - job.start_step) * tokens_per_step / train_s,
        "steps": args.steps,
        "elapsed_s": elapsed_s,
        "skipped_steps": job.optim.skipped_steps,
        "speculated_steps": stats["speculated_steps"],
        "rollbacks": stats["rollbacks"],
    }
    if stats["speculated_steps"]:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(stats["rollback_reasons"].items()))
        progress.line(
            f"optimizer inside backward in {stats['speculated_steps']} of {args.steps - job.start_step} steps, "
            f"{stats['rollbacks']} rolled back" + (f" ({reasons})" if reasons else "")
        )
    progress.line(
        f"done: train loss {train_loss:.4f} (mean of the last {len(recent)} steps), val loss {val_loss:.4f}, "
        f"{result['tokens_per_s']:,.0f} tokens/s, {_clock(elapsed_s)} elapsed"
        + (f", {job.optim.skipped_steps} steps skipped on fp16 overflow" if job.optim.skipped_steps else "")
    )
    return result


def save_checkpoint(job: Job, args: argparse.Namespace) -> None:
    """`--out DIR`: the run so far to DIR/last, with what a resumed run needs to continue exactly."""
    job_flags = {k: getattr(args, k) for k in ("model", "batch_size", "seq_len", "seed", "grad_accum", "data")}
    extra = {
        "job": job_flags, "batches": job.train_batches.state_dict(),
        "recent_losses": [t.detach().cpu() for t in job.recent],
    }
    elixir.save(job.model, job.optim, os.path.join(args.out, "last"), extra=extra, scheduler=job.scheduler)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """The progress display: one line redrawn in place (`\\r`) on a terminal, refreshed at most
    `refresh_s` apart; otherwise one line every `log_every` steps, so logs stay readable."""

    def __init__(
        self, total: int, out: TextIO, *, enabled: bool, log_every: int, refresh_s: float = 0.2
    ) -> None:
        self.total = total
        self.out = out
        self.enabled = enabled
        self.log_every = log_every
        self.refresh_s = refresh_s
        self.tty = enabled and out.isatty()
        self._bar_width = 0  # characters of the bar now on screen, 0 when none
        self._last_draw = -math.inf

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.tty:
            return time.perf_counter() - self._last_draw >= self.refresh_s
        return step % self.log_every == 0

    def update(self, step: int, *, loss: float, tokens_per_s: float, device_mib: float,
               device_peak_mib: float, host_mib: float, host_peak_mib: float, elapsed_s: float) -> None:
        if not self.enabled:
            return
        width = len(str(self.total))
        text = (
            f"step {step:>{width}}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
            f"device {device_mib:.1f}/{device_peak_mib:.1f} MiB | host {host_mib:.1f}/{host_peak_mib:.1f} MiB | "
            f"{_clock(elapsed_s)}"
        )
        if not self.tty:
            print(text, file=self.out, flush=True)
            return
        filled = round(10 * step / self.total)
        # A line wider than the terminal wraps, and `\r` then redraws only its last part.
        columns = shutil.get_terminal_size().columns
        text = f"[{'#' * filled}{'.' * (10 - filled)}] {text}"[: max(20, columns - 1)]
        self.out.write("\r" + text.ljust(self._bar_width))
        self.out.flush()
        self._bar_width = len(text)
        self._last_draw = time.perf_counter()
        if step == self.total:
            self._end_bar()

    def line(self, text: str) -> None:
        """A line of its own, printed above the bar."""
        if not self.enabled:
            return
        if self._bar_width:
            # Keep the bar's last state on screen and continue below it.
            self._end_bar()
        print(text, file=self.out, flush=True)

    def _end_bar(self) -> None:
        self.out.write("\n")
        self.out.flush()
        self._bar_width = 0


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
    result = loop(job, args)
    elixir.runtime_of(job.model).close()  # the disk tier's scratch file, if any, goes now
    if args.json and job.rank == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if dist.is_initialized():
        dist.barrier()  # ranks leave together
        dist.destroy_process_group()
    return 0
