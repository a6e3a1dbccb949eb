"""From flags to a job ready to train: `check_args` rejects bad flag values and fills in the defaults
that depend on the model, reading nothing but small files; `build` makes, in this order, the tokenizer,
the data (tokenized, cached, checked), the model, the plan (searched, read, or made by hand), the
optimizer and its schedule, and restores a checkpoint. Every error about the data or the tokenizer is
raised before the model is built.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import elixir
from elixir import accel, comm
from elixir.cli.train.flags import DEFAULT_SEQ_LEN, MIN_CHUNK_MIB, PLAN_FLAGS, checkpoint_path
from elixir.data import (
    ByteTokenizer,
    Fields,
    HFTokenizer,
    Rows,
    SequenceBatches,
    TokenBatches,
    Tokenizer,
    cache_key,
    cached,
    default_cache_root,
    find_sources,
    has_tokenizer,
    load_corpus,
    load_text,
    load_tokenizer,
    split,
    split_rows,
    tokenize,
)
from elixir.data.records import fingerprint as data_fingerprint
from elixir.models import GPT, GPTConfig
from elixir.plan import DTYPE_FLAGS

DTYPES = DTYPE_FLAGS
JOB_FLAGS = ("model", "batch_size", "seq_len", "seed", "grad_accum", "data", "tokenizer", "byte_tokens", "format",
             "text_field", "messages_field", "prompt_field", "response_field", "train_on_prompt", "packing",
             "val_fraction")
"""Flags a resumed run must share with the checkpoint: they decide which batch comes next."""


# --- flags --------------------------------------------------------------------------------------


def is_hf_folder(model: str) -> bool:
    return os.path.isfile(os.path.join(model, "config.json"))


def _hf_config(model: str) -> dict:
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    return config.get("text_config", config) if "vocab_size" not in config else config


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag, the value and the fix, for combinations that no single flag's
    parser can reject; fills in the defaults that depend on the model and the plan file. Reads only
    config.json files and the plan file."""
    hf = _check_model(args)
    _check_tokens(args, hf)
    if args.dtype is None:
        # bf16 halves memory and runs at tensor-core speed where the device has it; on a CPU it is
        # slower than fp32 on most machines, so fine-tuning there stays in fp32
        device = accel.default_device()
        bf16 = hf and device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.dtype = "bf16" if bf16 else "fp32"
    if args.lr is None:
        args.lr = 2e-5 if hf else 3e-3
    if args.weight_decay is None:
        args.weight_decay = 0.0 if hf else 0.1
    if args.beta2 is None:
        args.beta2 = 0.999 if hf else 0.95
    if args.warmup_steps is None:
        args.warmup_steps = max(1, min(100, args.steps // 10))
    _check_plan_args(args)
    if args.save_every is not None and args.out is None:
        raise ValueError(f"--save-every {args.save_every} needs --out DIR to say where checkpoints go")
    if args.keep_last is not None and args.out is None:
        raise ValueError(f"--keep-last {args.keep_last} needs --out DIR to say where checkpoints go")
    if "tensorboard" in args.report_to and args.out is None:
        raise ValueError("--report-to tensorboard writes its event files into --out DIR: add --out")
    import importlib.util

    for name in args.report_to:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name} needs the {name} package: pip install 'elixir-train[track]'")
    if args.resume == "auto":  # --out's last checkpoint, or a fresh start
        if args.out is None:
            raise ValueError("--resume auto resumes from --out's last checkpoint: add --out DIR")
        args.resume = checkpoint_path(args.out)
        args._resume_auto = True  # a run already at --steps is done, not an error (a relaunch loop ends there)
    if args.resume is not None:
        from elixir.checkpoint.manifest import MANIFEST

        found = checkpoint_path(args.resume)
        if found is None:
            raise ValueError(
                f"--resume {args.resume!r} is not a checkpoint (no {MANIFEST}); pass a folder that --out wrote"
            )
        args.resume = found
    if args.data is not None and not os.path.exists(args.data):
        raise ValueError(f"--data {args.data!r} does not exist; pass a file or a folder of files")
    if args.cache_dir is not None and os.path.isfile(args.cache_dir):
        raise ValueError(f"--cache-dir {args.cache_dir!r} is a file; pass a folder (it is made if missing)")
    _check_moe_args(args)


def _check_model(args: argparse.Namespace) -> bool:
    """Whether --model is a Hugging Face folder; checks --seq-len against the model's longest sequence."""
    if args.model in GPTConfig.preset_names():
        hf, block_size = False, GPTConfig.preset(args.model).block_size
    elif is_hf_folder(args.model):
        hf = True
        config = _hf_config(args.model)
        block_size = next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                           if k in config), 2**31 - 1)
    else:
        raise ValueError(
            f"--model {args.model!r} is neither a preset ({', '.join(GPTConfig.preset_names())}) nor a folder with a "
            "config.json; pass a preset name or a Hugging Face model folder"
        )
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, block_size)
    if args.seq_len > block_size:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the longest sequence of --model {args.model}, {block_size} tokens; "
            f"use --seq-len {block_size} or less"
        )
    return hf


def _check_tokens(args: argparse.Namespace, hf: bool) -> None:
    if args.byte_tokens and args.tokenizer is not None:
        raise ValueError(f"--byte-tokens and --tokenizer {args.tokenizer!r} contradict each other; keep one")
    if not hf:
        if args.tokenizer is not None:
            raise ValueError(
                f"--tokenizer {args.tokenizer!r}: the GPT presets read bytes (a 256-token vocabulary); fine-tune a "
                "Hugging Face --model folder to use a tokenizer"
            )
        return
    if args.byte_tokens:
        vocab = _hf_config(args.model).get("vocab_size", 0)
        if vocab < 256:
            raise ValueError(
                f"--model {args.model!r}: vocab_size {vocab} is below 256, but --byte-tokens feeds ids 0-255; "
                "use the model's tokenizer instead (leave --byte-tokens out)"
            )
    elif args.tokenizer is None and not has_tokenizer(args.model):
        raise ValueError(
            f"--model {args.model!r} has no tokenizer (no tokenizer.json or tokenizer.model); pass --tokenizer PATH "
            "to the folder of its tokenizer, or --byte-tokens to train on raw bytes (ids 0-255) on purpose"
        )


def _check_plan_args(args: argparse.Namespace) -> None:
    hand = [f for f in PLAN_FLAGS if getattr(args, f) is not None]
    if args.plan != "auto":
        if hand:
            raise ValueError(
                f"--plan {args.plan!r} and --{hand[0].replace('_', '-')}: hand flags make a uniform plan instead of "
                "the file's; keep one or the other"
            )
        try:
            with open(args.plan) as f:
                plan = elixir.Plan.from_json(f.read())
        except OSError as e:
            raise ValueError(
                f"--plan {args.plan!r} cannot be read ({e.strerror}); pass a file from elixir plan --json"
            ) from None
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"--plan {args.plan!r} is not a plan ({e}); pass a file from elixir plan --json") from None
        world = comm.launched_world_size()
        for flag, value in (("batch_size", plan.micro_batch_size * world), ("grad_accum", plan.grad_accum)):
            if not plan.micro_batch_size and flag == "batch_size":
                continue
            given = getattr(args, flag)
            if given is not None and given != value:
                raise ValueError(
                    f"--{flag.replace('_', '-')} {given}, but --plan {args.plan!r} was searched for {value} "
                    f"({plan.micro_batch_size} sequences per rank x {world} rank(s), {plan.grad_accum} micro-batches); "
                    "leave the flag out, or plan again"
                )
            setattr(args, flag, value)
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[plan.compute_dtype]
        if args.dtype is not None and args.dtype != dtype:
            raise ValueError(f"--dtype {args.dtype}, but --plan {args.plan!r} computes in {dtype}; leave --dtype out")
        args.dtype = dtype
        args._plan = plan
    _check_shard_over(args)
    if args.batch_size is None:
        args.batch_size = 8
    if args.grad_accum is None:
        args.grad_accum = 1
    if hand:
        if args.param_home == "host" and args.resident is not False:
            raise ValueError(
                "--param-home host: resident chunks stay gathered on the device, so their shards cannot live "
                "on host; add --on-demand"
            )
        if args.optim_home == "disk" and args.disk is None:
            raise ValueError("--optim-home disk keeps masters and optimizer states in a scratch file: add --disk DIR")
        if args.disk is not None and args.optim_home != "disk":
            raise ValueError(f"--disk {args.disk!r} is for --optim-home disk; add it, or leave --disk out")
    if args.hardware != "measure" and not os.path.isfile(args.hardware):
        from elixir.hardware import Hardware

        if args.hardware not in Hardware.preset_names():
            raise ValueError(
                f"--hardware {args.hardware!r} is neither 'measure', a preset ({', '.join(Hardware.preset_names())}) "
                "nor a Hardware JSON file"
            )
    from elixir.hardware import parse_bytes

    for flag in ("gpu_memory", "host_memory"):
        value = getattr(args, flag)
        if value is not None:
            try:
                if parse_bytes(value) <= 0:
                    raise ValueError("must be above 0")
            except ValueError as e:
                raise ValueError(f"--{flag.replace('_', '-')} {value!r}: {e}; e.g. 20GiB") from None


def shard_layout(plan: elixir.Plan) -> str:
    """How `plan` shards its chunks: "world", "node" (every chunk inside each node), or "mixed" (some chunks
    inside nodes, others, such as expert chunks whose ranks do not spread evenly over the nodes, over the
    world)."""
    overs = {c.shard_over for c in plan.chunks}
    return overs.pop() if len(overs) == 1 else "mixed"


def layout_line(plan: elixir.Plan, requested: str) -> str:
    """What `elixir train` prints under the plan's summary: where the chunks are sharded, and who chose it."""
    ranks = plan.world_size
    per_node = ranks // plan.nodes
    layout = shard_layout(plan)
    where = f" of {plan.nodes} nodes" if plan.nodes > 1 else ""
    if layout == "world":
        text = f"layout: every chunk sharded over all {ranks} ranks{where}"
    elif layout == "node":
        text = (f"layout: every chunk sharded over the {per_node} ranks of each node, replicated across "
                f"{plan.nodes} nodes")
    else:
        inside = sum(c.shard_over == "node" for c in plan.chunks)
        text = (f"layout: {inside} chunk(s) sharded over the {per_node} ranks of each node and replicated across "
                f"{plan.nodes} nodes, {len(plan.chunks) - inside} over all {ranks} ranks")
    return text + (f" (--shard-over {requested})" if requested != "auto" else "")


def _launch_environment() -> dict:
    """The environment the process group will be made from: torchrun's, or Slurm's read as torchrun's
    (as `elixir.init_distributed` does), before the group exists."""
    env = dict(os.environ)
    try:
        slurm = "WORLD_SIZE" not in env and int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        slurm = False
    if slurm:
        try:
            env.update(comm.slurm_environment(env))
        except (KeyError, ValueError):
            pass  # init_distributed names what is missing
    return env


def _check_shard_over(args: argparse.Namespace) -> None:
    """--shard-over against the --plan file and against the nodes this launch describes (torchrun's
    environment): ValueError naming the value and the fix, before the process group or anything else."""
    over = args.shard_over
    plan = getattr(args, "_plan", None)
    if plan is not None and over != "auto":
        layout = shard_layout(plan)
        if (over == "node") != (layout in ("node", "mixed")):
            said = {"world": "over all ranks", "node": "inside each node", "mixed": "partly inside each node"}[layout]
            raise ValueError(
                f"--shard-over {over}, but --plan {args.plan!r} shards its chunks {said}; leave --shard-over out (the "
                f"plan file decides), or make the plan again with elixir plan --shard-over {over}"
            )
    if over != "node":
        return
    env = _launch_environment()
    fix = ("use --shard-over world (or auto), or launch several nodes: torchrun --nnodes N --nproc-per-node G "
           "on each")
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        raise ValueError(f"--shard-over node shards chunks over the ranks of each node, but this is one process; {fix}")
    from elixir.parallel.nodes import node_layout_from_env

    try:
        rank = int(env["RANK"]) if "RANK" in env else int(env["GROUP_RANK"]) * int(env["LOCAL_WORLD_SIZE"]) + int(
            env["LOCAL_RANK"])
    except (KeyError, ValueError):
        rank = 0  # node_layout_from_env names the variable that is missing or not a number
    try:
        layout = node_layout_from_env(world, rank, env)
    except ValueError as e:
        raise ValueError(f"--shard-over node: {e}") from None
    if layout is None:
        raise ValueError(
            f"--shard-over node: the launch of {world} ranks does not say which node each runs on (no "
            "LOCAL_WORLD_SIZE): launch with torchrun, which sets it with LOCAL_RANK and GROUP_RANK, or use "
            "--shard-over world (or auto)"
        )
    if layout.nodes == 1:
        raise ValueError(
            f"--shard-over node: all {world} ranks run on one node (LOCAL_WORLD_SIZE={layout.ranks_per_node}, "
            f"WORLD_SIZE={world}), where sharding inside the node is sharding over all ranks; {fix}"
        )


def _check_moe_args(args: argparse.Namespace) -> None:
    if args.experts and is_hf_folder(args.model):
        raise ValueError(f"--experts {args.experts}: a Hugging Face --model brings its own experts; leave it out")
    experts = args.experts or (_hf_experts(args.model) if is_hf_folder(args.model) else 0)
    if args.ep_size > 1 and not experts:
        raise ValueError(
            f"--ep-size {args.ep_size} spreads experts over ranks: it needs a GPT preset with --experts E, or a "
            "Hugging Face Mixture-of-Experts model"
        )
    if args.experts and args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k} exceeds --experts {args.experts}; use --top-k {args.experts} or less")
    if experts:
        from elixir.parallel import check_expert_parallel

        try:
            check_expert_parallel(experts, args.ep_size, comm.launched_world_size())
        except ValueError as e:
            raise ValueError(f"--ep-size {args.ep_size} with {experts} experts: {e}") from None


def _hf_experts(model: str) -> int:
    """Experts per MoE layer of a Hugging Face config.json (0 for a dense model)."""
    config = _hf_config(model)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    return 0


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Data:
    """The batches of a run: training (with a position saved in checkpoints) and validation."""

    train: TokenBatches | SequenceBatches
    val: Callable[[], Iterator[dict[str, torch.Tensor]]]
    """A fresh validation stream: every evaluation sees the same batches."""
    description: str
    masked: bool
    """Some labels are -100: the loss is normalized by the tokens trained over all ranks (see loop)."""


def _tokenizer(args: argparse.Namespace) -> Tokenizer:
    if not is_hf_folder(args.model) or args.byte_tokens:
        return ByteTokenizer()
    return load_tokenizer(args.tokenizer or args.model)


def build_data(args: argparse.Namespace, tokenizer: Tokenizer, rank: int, world: int,
               position_ids: bool) -> Data:
    """Byte tokens on plain text: random windows (TokenBatches). Anything else: documents, tokenized by
    rank 0 into the cache (the other ranks wait, then map it), cut into rows."""
    sources = find_sources(args.data)
    windows = isinstance(tokenizer, ByteTokenizer) and args.format in ("auto", "text") and all(
        s.kind in ("text", "corpus") for s in sources)
    if windows:
        return _byte_windows(args, rank, world)
    fields = Fields(args.format, args.text_field, args.messages_field, args.prompt_field, args.response_field,
                    args.train_on_prompt)
    root = default_cache_root() if args.cache_dir is None else Path(args.cache_dir)
    key = cache_key(data_fingerprint(sources), fields, tokenizer.fingerprint())

    def make():
        docs, info = tokenize(sources, fields, tokenizer)
        return docs, info

    # rank 0 tokenizes (or finds the cache); the others learn its outcome, an error included, and map the cache
    status: list = [None]
    if rank == 0:
        try:
            docs, hit = cached(root, key, make)
            status = [("ok", hit)]
        except ValueError as e:
            status = [("error", str(e))]
            failure = e
    if world > 1:
        dist.broadcast_object_list(status, src=0)
    if status[0][0] == "error":
        if rank == 0:
            raise failure
        raise ValueError(status[0][1])
    if rank != 0:
        docs, _ = cached(root, key, make)
    hit = status[0][1]
    _check_token_ids(docs, tokenizer, args)
    rows = Rows(docs, args.seq_len, packing=args.packing, pad_id=tokenizer.pad_token_id, position_ids=position_ids)
    train_ids, val_ids = split_rows(rows.num_rows, args.val_fraction)
    train = SequenceBatches(rows, train_ids, batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world)

    def val():
        return SequenceBatches(rows, val_ids, batch_size=args.batch_size, rank=rank, world_size=world, shuffle=False)

    trained = int((docs.labels != -100).sum())
    long_docs = rows.truncated()
    cut = (f"; {long_docs} longer than a row " + ("cut" if args.packing == "pad" else "continued in the next row")
           if long_docs else "")
    description = (
        f"data: {len(docs):,} documents, {docs.num_tokens:,} tokens ({trained:,} trained) by {tokenizer.name}, "
        f"{'from the cache' if hit else 'tokenized and cached'} in {root / key}; {rows.num_rows:,} rows of "
        f"{args.seq_len} ({args.packing}ed), {len(train_ids):,} to train on and {len(val_ids):,} held out{cut}"
    )
    return Data(train, val, description, masked=trained < docs.num_tokens)


def _check_token_ids(docs, tokenizer: Tokenizer, args: argparse.Namespace) -> None:
    if not len(docs.tokens):
        return
    top = int(docs.tokens.max())
    vocab = _vocab_size(args)
    if top >= vocab:
        raise ValueError(
            f"--data {args.data!r}: token id {top} is outside the model's embedding ({vocab} rows); use the model's "
            "own tokenizer, or pretokenize with it"
        )


def _vocab_size(args: argparse.Namespace) -> int:
    if is_hf_folder(args.model):
        return int(_hf_config(args.model).get("vocab_size", 0))
    return GPTConfig.preset(args.model).vocab_size


def _byte_windows(args: argparse.Namespace, rank: int, world: int) -> Data:
    data = load_text(args.data) if args.data is not None else load_corpus()
    train_data, val_data = split(data, args.val_fraction)
    if len(val_data) < args.seq_len + 1:
        raise ValueError(
            f"--data {args.data!r}: its validation part (the last {args.val_fraction:g}) has {len(val_data)} bytes, "
            f"fewer than --seq-len + 1 = {args.seq_len + 1}; use a shorter --seq-len or more text"
        )
    train = TokenBatches(train_data, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, rank=rank,
                         world_size=world)

    def val():
        return TokenBatches(val_data, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed + 1,
                            rank=rank, world_size=world)

    source = "the embedded corpus" if args.data is None else repr(args.data)
    description = f"data: {len(data):,} bytes of {source} as byte tokens, random windows of {args.seq_len}"
    return Data(train, val, description, masked=False)


# --- model, plan, optimizer -----------------------------------------------------------------------


@dataclass
class Job:
    """Everything the loop needs, built by `build`."""

    model: torch.nn.Module
    optim: elixir.ElixirOptimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: elixir.Plan
    data: Data
    device: torch.device
    num_params: int
    rank: int
    world_size: int
    hardware: object
    flops_per_micro_batch: int
    """FLOPs of one micro-batch on one rank, as the profiler counts them."""
    prediction: dict
    """The cost model's prediction for the plan (step_s, compute_s, stall_s, ...); {} when it has none."""
    tokenizer: Tokenizer
    count_items: bool = False
    """The model takes num_items_in_batch: the loss is a sum over the step's trained tokens on all ranks."""
    start_step: int = 0  # optimizer steps already taken (a resumed run)
    recent_losses: list = field(default_factory=list)  # the last steps' losses before the start (a resumed run)
    recent: object = None  # the last steps' losses while the loop runs (checkpoints keep them)
    finished: bool = False  # --resume auto found the run at --steps already: nothing to train
    on_step: object = None
    """Called as on_step(step) after each step's update (and its save and evaluation, if any): a probe for
    tools that watch a run (bench/soak.py); None in `elixir train`."""


def lr_factor(step: int, steps: int, *, warmup: int | None = None, schedule: str = "cosine",
              min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based): linear warmup over
    `warmup` steps (default: a tenth of the run, at most 100), then `schedule` (cosine or linear decay
    to `min_ratio`, or constant)."""
    if warmup is None:
        warmup = max(1, min(100, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def _build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """The model (a reference GPT, or a Hugging Face model built on the meta device) and its size."""
    if not is_hf_folder(args.model):
        moe = dict(n_experts=args.experts, top_k=args.top_k) if args.experts else {}
        model = GPT(GPTConfig.preset(args.model, **moe))
        if args.checkpointing:
            model.gradient_checkpointing_enable()
        return model, model.num_params()
    transformers = _transformers(args)
    config = transformers.AutoConfig.from_pretrained(args.model)
    config.use_cache = False  # training keeps no key/value cache
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), sum(p.numel() for p in model.parameters())


def _transformers(args: argparse.Namespace):
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"--model {args.model!r} is a Hugging Face folder, which needs transformers: pip install 'elixir-train[hf]'"
        ) from None
    return transformers


def _takes(model: torch.nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _hardware(args: argparse.Namespace):
    from elixir.hardware import Hardware

    if args.hardware == "measure":
        hw = Hardware.measure(disk=args.disk) if args.disk else Hardware.measure()
    elif os.path.isfile(args.hardware):
        with open(args.hardware) as f:
            hw = Hardware.from_json(f.read())
    else:
        hw = Hardware.preset(args.hardware)
    if args.gpu_memory is not None or args.host_memory is not None:
        hw = hw.with_memory(device_bytes=args.gpu_memory, host_bytes=args.host_memory)
    return hw


def _uniform_plan(args: argparse.Namespace, model: torch.nn.Module, optim, dtype: torch.dtype) -> elixir.Plan:
    chunk_mib = args.chunk_mib
    if chunk_mib is None:
        biggest_mib = max(p.numel() for p in model.parameters()) * dtype.itemsize / 2**20
        chunk_mib = max(MIN_CHUNK_MIB, math.ceil(biggest_mib))
    return elixir.Plan.uniform(
        model, chunk_mib=chunk_mib, cache_blocks=args.cache_blocks or 4,
        resident=args.resident if args.resident is not None else True, param_home=args.param_home or "device",
        optim_home=args.optim_home or "device", compute_dtype=dtype,
        prefetch_depth=args.prefetch_depth if args.prefetch_depth is not None else 2, optimizer=optim,
        grad_accum=args.grad_accum, shard_over="world" if args.shard_over == "auto" else args.shard_over,
    )


def build(args: argparse.Namespace) -> Job:
    """Tokenizer, data, model, plan, optimizer, schedule and checkpoint. Raises ValueError for values that
    only the data or the model can show wrong (a field missing, text too short, chunks too small, ...)."""
    rank, world_size = comm.rank_and_world()
    tokenizer = _tokenizer(args)
    if len(tokenizer) > _vocab_size(args):
        raise ValueError(
            f"the tokenizer of {tokenizer.name!r} has {len(tokenizer):,} tokens, more than the {_vocab_size(args):,} "
            f"rows of --model {args.model!r}'s embedding; pass the model's own tokenizer (--tokenizer PATH)"
        )
    hf = is_hf_folder(args.model)
    if hf:  # whether the model reads position ids, known from its class before it is built
        transformers = _transformers(args)
        config = transformers.AutoConfig.from_pretrained(args.model)
        cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        position_ids = "position_ids" in inspect.signature(cls.forward).parameters
    else:
        position_ids = False
    data = build_data(args, tokenizer, rank, world_size, position_ids)

    torch.manual_seed(args.seed)
    model, num_params = _build_model(args)
    if args.ep_size > 1:  # every rank keeps its experts only, before the plan is made
        elixir.parallel.expert_parallel(model, args.ep_size)
    count_items = hf and data.masked and _takes(model, "num_items_in_batch")
    # Weight decay on matrices (and embeddings) only, as in GPT-2; biases and norms keep theirs.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(args.beta1, args.beta2), fused=True,
    )
    dtype = DTYPES[args.dtype]
    example = data.train.peek()  # the first batch: its shape is the micro-batch the plan is made for
    profile = elixir.profile(model, example, compute_dtype=dtype)
    hardware = _hardware(args)
    device = accel.default_device()
    if getattr(args, "_plan", None) is not None:
        model, optim = elixir.wrap(model, optim, plan=args._plan, device=device, disk=args.disk,
                                   nonfinite=args.nonfinite)
    elif any(getattr(args, f) is not None for f in PLAN_FLAGS):
        plan = _uniform_plan(args, model, optim, dtype)
        model, optim = elixir.wrap(model, optim, plan=plan, device=device, disk=args.disk,
                                   nonfinite=args.nonfinite)
    else:  # the planner: rank 0 searches, every rank takes its plan (elixir.wrap's plan="auto")
        name = str(dtype).removeprefix("torch.")
        if name not in hardware.matmul_flops:
            raise ValueError(
                f"--dtype {args.dtype}: {hardware.name} has no matmul rate for {name} (it has "
                f"{', '.join(hardware.matmul_flops)}), so the planner cannot time a plan; use one of those, or make "
                "the plan by hand (--resident, or --on-demand ...)"
            )
        model, optim = elixir.wrap(model, optim, plan="auto", device=device, disk=args.disk, compute_dtype=dtype,
                                   example_batch=example, hardware=hardware, nonfinite=args.nonfinite,
                                   shard_over=args.shard_over)
    plan = elixir.plan_of(model)
    prediction = dict(plan.predicted)
    if not prediction:
        from elixir.search.cost import simulate

        try:
            prediction = simulate(profile, plan, hardware).as_dict()
        except (ValueError, KeyError, AssertionError):
            prediction = {}  # a plan the cost model cannot replay still trains; it just has no prediction
    if hf and args.resume is None:
        elixir.load_pretrained(model, args.model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: lr_factor(
        step, args.steps, warmup=args.warmup_steps, schedule=args.schedule, min_ratio=args.min_lr_ratio))
    job = Job(model, optim, scheduler, plan, data, device, num_params, rank, world_size, hardware,
              profile.total_flops, prediction, tokenizer, count_items)
    if args.resume is not None:
        _resume(job, args)
    return job


def _resume(job: Job, args: argparse.Namespace) -> None:
    extra = elixir.load(job.model, job.optim, args.resume, scheduler=job.scheduler)
    saved = (extra or {}).get("job", {})
    for key in JOB_FLAGS:
        if key in saved and saved[key] != getattr(args, key):
            raise ValueError(
                f"--resume {args.resume!r} was saved with --{key.replace('_', '-')} {saved[key]}, this run has "
                f"{getattr(args, key)}; resume with the same model and data flags"
            )
    job.start_step = job.optim.steps
    if job.start_step >= args.steps and getattr(args, "_resume_auto", False):
        job.finished = True
        return
    if job.start_step >= args.steps:
        raise ValueError(f"--resume {args.resume!r} is at step {job.start_step}; use --steps above it to train on")
    job.data.train.load_state_dict(extra["batches"])
    job.recent_losses = _own_recent_losses(extra.get("recent_losses", []), job.rank, job.world_size)


def _own_recent_losses(saved: list, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's last losses from a checkpoint: its own on the same number of ranks, else the mean over
    the saved ranks, step by step (the final train loss, a mean over ranks, stays the same)."""
    if not saved or torch.is_tensor(saved[0]):  # one list: a single rank's
        return list(saved)
    if len(saved) == world_size:
        return list(saved[rank])
    return list(torch.stack([torch.stack(list(losses)) for losses in saved]).mean(0)) if saved[0] else []


def hf_files(job: Job, args: argparse.Namespace) -> dict:
    """What an exported Hugging Face folder carries beside the weights and config.json: the tokenizer's
    files and generation_config.json (binary files as uint8 tensors, which checkpoints store)."""
    if not is_hf_folder(args.model):
        return {}
    files: dict = dict(job.tokenizer.files()) if isinstance(job.tokenizer, HFTokenizer) else {}
    gen = os.path.join(args.model, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as f:
            files["generation_config.json"] = f.read()
    return {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) if isinstance(v, bytes) else v
            for k, v in files.items()}
