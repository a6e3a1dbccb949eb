"""Plan a model for a machine: profile one step on the meta device, search the plan, print it.

`elixir plan --model opt-30b --gpus 1 --gpu A100-40GB --host-memory 512GiB` profiles OPT-30B (by its
published dimensions, built on the meta device: nothing is allocated) at the given batch, searches
the fastest plan that fits one GPU's memory and its share of the host memory, and prints what lives
where, the predicted step time, TFLOPS per GPU and the peak bytes per tier. With `--tokens-per-step`
(the global batch) it also chooses the micro-batch, the accumulation steps and activation
checkpointing. `--nodes 2 --gpus 8 --inter-node 4x200Gbps` plans for two nodes of eight GPUs whose links
between nodes are as given (see `elixir.hardware.parse_link`): the search chooses whether chunks are
sharded over all 16 GPUs or inside each node (`--shard-over` fixes it). `--json` writes the plan
(loadable with elixir.Plan.from_json) with its prediction;
`--plot` draws memory over the step and where each chunk lives.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from elixir.hardware import Hardware, parse_bytes, parse_link
from elixir.models.checkpointing import apply_checkpointing
from elixir.models.families import build_family, family_names
from elixir.plan import DTYPE_FLAGS
from elixir.profile import profile
from elixir.search import PlanDoesNotFitError, search
from elixir.search.api import plan_batch, timed_block
from elixir.search.block import BlockInputs
from elixir.validation import check_output_file, require_package

DTYPES = DTYPE_FLAGS
GiB = 2**30


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rate(text: str) -> float:
    """Bytes per second: "6GB/s", "6GB", "5.5e9"."""
    try:
        return float(parse_bytes(text.removesuffix("/s")))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; a bandwidth is a size per second, e.g. 6GB/s") from None


def _link(text: str) -> tuple[float, float]:
    try:
        return parse_link(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"a preset ({', '.join(family_names())}) or a HF config.json path")
    p.add_argument("--gpus", type=_positive, default=1,
                   help="GPUs (ranks) per node; the model data is sharded over --nodes x --gpus of them")
    p.add_argument("--nodes", type=_positive, default=1, help="nodes (machines) of --gpus GPUs each")
    p.add_argument("--inter-node", type=_link, default=None, metavar="LINK",
                   help="each node's links to the others: a line rate (100Gbps, 4x200Gbps for four NICs) or a "
                   "link name (ethernet-100g, roce-200g, ib-hdr-200g, ib-ndr-400g, 4xib-hdr-200g, ...); default: "
                   "the preset's figure for the whole run")
    p.add_argument("--shard-over", choices=("auto", "world", "node"), default="auto",
                   help="with several nodes: shard chunks over every GPU (world), inside each node (node), or "
                   "let the search choose (auto, the default)")
    p.add_argument("--gpu", default=None, help=f"hardware preset ({', '.join(Hardware.preset_names())}); "
                   "default: measure this machine")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine again and replace its cached rates (not with --gpu)")
    p.add_argument("--gpu-memory", type=_size, default=None, help="device memory per GPU, e.g. 40GiB")
    p.add_argument("--host-memory", type=_size, default=None,
                   help="host memory of the machine, shared by its GPUs, e.g. 512GiB")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="sequences per GPU per step, one micro-batch (default 1); not with --tokens-per-step")
    p.add_argument("--tokens-per-step", type=_positive, default=None, metavar="N",
                   help="global batch in tokens per optimizer step over all GPUs: the planner chooses the "
                   "micro-batch, accumulation steps and activation checkpointing (sequences of --seq-len)")
    p.add_argument("--seq-len", type=_positive, default=1024, help="tokens per sequence")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of every layer (with --batch-size; --tokens-per-step chooses)")
    p.add_argument("--prefetch-depth", type=int, default=2, help="chunks fetched ahead of use")
    p.add_argument("--disk-memory", type=_size, default=None, metavar="SIZE",
                   help="scratch disk of the machine for optimizer states (the disk tier), shared by its GPUs, "
                   "e.g. 4TB; 0 for none (default: the preset's, or none for a measured machine)")
    p.add_argument("--disk-bandwidth", type=_rate, default=None, metavar="RATE",
                   help="sequential read bandwidth of that disk, shared by the GPUs, e.g. 6GB/s; writes are "
                   "taken at --disk-write-bandwidth or 70%% of it (default: the preset's)")
    p.add_argument("--disk-write-bandwidth", type=_rate, default=None, metavar="RATE",
                   help="sequential write bandwidth of the disk, shared by the GPUs (default: see --disk-bandwidth)")
    p.add_argument("--json", metavar="PATH", help="write the plan and its prediction as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw memory over the step and where each chunk lives")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.gpu is not None and args.gpu not in Hardware.preset_names():
        parser.error(f"--gpu {args.gpu!r} is not a preset; use one of {', '.join(Hardware.preset_names())}")
    if args.prefetch_depth < 0:
        parser.error(f"--prefetch-depth {args.prefetch_depth} must be 0 or more")
    world = args.gpus * args.nodes
    if args.inter_node is not None and args.nodes == 1:
        parser.error("--inter-node describes the links between nodes: give --nodes too (2 or more)")
    if args.tokens_per_step is not None:
        if args.batch_size is not None or args.checkpointing:
            parser.error("--tokens-per-step chooses the micro-batch and checkpointing itself: leave out "
                         "--batch-size and --checkpointing, or leave out --tokens-per-step to fix them")
        per_step = args.seq_len * world
        if args.tokens_per_step % per_step:
            lower = max(per_step, args.tokens_per_step // per_step * per_step)
            parser.error(f"--tokens-per-step {args.tokens_per_step} is not a whole number of --seq-len "
                         f"{args.seq_len} sequences on each of {world} GPU(s); use a multiple of {per_step}, "
                         f"e.g. {lower}")
    if args.calibrate and args.gpu:
        parser.error(f"--calibrate measures this machine; --gpu {args.gpu} plans for a preset instead: pass one")
    # everything the end of the run needs, checked before the search: a missing package or an unwritable
    # path found after minutes of planning would throw the plan away
    try:
        require_package("transformers", needed_for="elixir plan --model", install="pip install 'elixir-train[hf]'")
        if args.plot:
            require_package("matplotlib", needed_for="--plot", install="pip install 'elixir-train[plot]'")
            check_output_file(args.plot, flag="--plot")
        if args.json:
            check_output_file(args.json, flag="--json")
    except ValueError as e:
        parser.error(str(e))
    try:
        model = build_family(args.model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    hw = Hardware.preset(args.gpu) if args.gpu else Hardware.measure(refresh=args.calibrate)
    if args.gpu_memory:
        hw = hw.with_memory(device_bytes=args.gpu_memory)
    if args.host_memory:
        hw = hw.with_memory(host_bytes=args.host_memory // args.gpus)
    if args.disk_memory is not None or args.disk_bandwidth is not None or args.disk_write_bandwidth is not None:
        read = args.disk_bandwidth / args.gpus if args.disk_bandwidth else hw.disk_read_bytes_per_s
        write = args.disk_write_bandwidth / args.gpus if args.disk_write_bandwidth else (
            0.7 * read if args.disk_bandwidth else hw.disk_write_bytes_per_s)
        disk = args.disk_memory // args.gpus if args.disk_memory is not None else hw.disk_bytes
        if disk and not read:
            parser.error(f"--disk-memory {args.disk_memory}: give the disk's bandwidth too (--disk-bandwidth "
                         "6GB/s); this hardware has none")
        hw = hw.with_disk(disk_bytes=disk, read_bytes_per_s=read if disk else 0.0,
                          write_bytes_per_s=write if disk else 0.0)
    if args.inter_node is not None:
        hw = hw.with_network(inter_node_bytes_per_s=args.inter_node[0], inter_node_latency_s=args.inter_node[1])
    over = None if args.shard_over == "auto" else args.shard_over
    model.train()
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    try:
        if args.tokens_per_step is not None:
            ids = torch.zeros((1, args.seq_len), dtype=torch.long)
            found = plan_batch(model, {"input_ids": ids, "labels": ids}, hardware=hw, world_size=world,
                               compute_dtype=dtype, prefetch_depth=args.prefetch_depth,
                               tokens_per_step=args.tokens_per_step, nodes=args.nodes, shard_over=over)
            plan, pred, prof = found.plan, found.prediction, found.profile
            timing = f"(planned in {time.perf_counter() - started:.1f} s, {found.profiles_traced} profile(s) traced)"
        else:
            if args.checkpointing:
                apply_checkpointing(model, 1)
            batch_size = args.batch_size or 1
            ids = torch.zeros((batch_size, args.seq_len), dtype=torch.long)
            with BlockInputs(model) as block:
                prof = profile(model, {"input_ids": ids, "labels": ids}, compute_dtype=dtype)
            hw = timed_block(block, hw, dtype, {})  # this machine's rates: its first block timed here
            profiled_s = time.perf_counter() - started
            plan, pred = search(prof, hw, world_size=world, compute_dtype=dtype,
                                prefetch_depth=args.prefetch_depth, nodes=args.nodes, shard_over=over)
            plan = dataclasses.replace(plan, use_order=tuple(prof.use_sequence()),
                                       predicted={**pred.as_dict(), "compute_scale": hw.compute_scale})
            timing = f"(profiled in {profiled_s:.1f} s, searched in {time.perf_counter() - started - profiled_s:.1f} s)"
    except PlanDoesNotFitError as e:
        print(f"elixir plan: {e}")
        return 1
    params = sum(prof.param_numels.values())
    micro = plan.micro_batch_size or args.batch_size or 1
    every = plan.checkpoint_every or (1 if args.checkpointing else 0)
    tokens = micro * plan.grad_accum * args.seq_len  # per GPU and step
    tflops = pred.flops / pred.step_s / 1e12
    # the rule of thumb counts 6 FLOPs per parameter and token, 8 when every block is recomputed; it has no
    # figure for every k-th block, and ignores attention: the profiled FLOPs are what is reported first
    factor = {0: 6, 1: 8}.get(every)
    rule = f"; {factor * params * tokens / pred.step_s / 1e12:.1f} by {factor} x params x tokens" if factor else ""
    checkpointing = ("no activation checkpointing" if not every else "activation checkpointing of every block"
                     if every == 1 else f"activation checkpointing of every {every} blocks")
    gpus = f"{args.nodes} x {args.gpus}" if args.nodes > 1 else f"{args.gpus}"
    print(f"{args.model}: {params / 1e9:.2f} B parameters; {gpus} x {hw.name} "
          f"({hw.device_bytes / GiB:.0f} GiB device, {hw.host_bytes / GiB:.0f} GiB host per rank); "
          f"{dtype}, sequences of {args.seq_len} tokens")
    if args.tokens_per_step is not None:
        print(f"batch               {args.tokens_per_step:,} tokens per step = {world} GPU(s) x "
              f"{plan.grad_accum} micro-batch(es) x {micro} sequence(s) x {args.seq_len} tokens (chosen: "
              f"micro-batch {micro}, {plan.grad_accum} accumulation step(s), {checkpointing})")
    else:
        print(f"batch               {micro} x {args.seq_len} per GPU, one micro-batch per step, {checkpointing}")
    if args.nodes > 1:
        link = (f"{hw.inter_node_bytes_per_s / 1e9:.1f} GB/s per node between nodes" if hw.inter_node_bytes_per_s
                else f"{hw.bus_rate(world, across_nodes=True, world_size=world) / 1e9:.1f} GB/s bus bandwidth over "
                f"all {world} GPUs")
        layouts = sorted({c.shard_over for c in plan.chunks})
        how = {"world": "over all GPUs", "node": "inside each node, replicated across nodes"}
        print(f"sharding            {' and '.join(how[o] for o in layouts)} "
              f"({'--shard-over ' + args.shard_over if over else 'chosen by the search'}; {link})")
    print(plan.summary())
    print(f"predicted step      {pred.step_s:.3f} s (compute {pred.compute_s:.3f} s, waiting for chunks "
          f"{pred.stall_s:.3f} s, optimizer {pred.optim_s:.3f} s after backward, "
          f"{pred.optim_in_backward_s:.3f} s inside it)")
    scale = plan.predicted.get("compute_scale", 1.0)
    if scale != 1.0:
        print(f"compute scale       {scale:.2f}: the model's first block, timed here, took that many times what the "
              "calibration's rates predict for its operators; every operator is charged so")
    print(f"throughput per GPU  {tokens / pred.step_s:,.0f} tokens/s, {tflops:.1f} TFLOPS by the profiled FLOPs "
          f"(recomputation included){rule}")
    print(f"peak device         {pred.device_bytes_peak / GiB:.2f} GiB "
          f"(model data {pred.model_device_bytes / GiB:.2f}, activations {pred.activation_bytes / GiB:.2f}) "
          f"of {hw.device_bytes / GiB:.2f} GiB")
    print(f"peak host           {pred.host_bytes_peak / GiB:.2f} GiB per rank of {hw.host_bytes / GiB:.2f} GiB")
    if pred.model_disk_bytes:
        print(f"scratch disk        {pred.model_disk_bytes / GiB:.2f} GiB per rank of {hw.disk_bytes / GiB:.2f} GiB, "
              f"busy {pred.disk_busy_s:.3f} s of the step at {hw.disk_read_bytes_per_s / 1e9:.2f} GB/s read, "
              f"{hw.disk_write_bytes_per_s / 1e9:.2f} GB/s write per rank")
    print(timing)
    if args.json:
        with open(args.json, "w") as f:
            f.write(plan.to_json())
    if args.plot:
        _plot(args.plot, prof, plan, pred, hw)
    summary = {"shard_over": sorted({c.shard_over for c in plan.chunks}),
               "step_s": pred.step_s, "tflops_per_gpu": tflops, "tokens_per_s_per_gpu": tokens / pred.step_s,
               "micro_batch_size": micro, "grad_accum": plan.grad_accum, "checkpoint_every": every}
    args._result = {**summary, "plan": json.loads(plan.to_json())}
    return 0


def _plot(path: str, prof, plan, pred, hw) -> None:
    import matplotlib  # present: run() checked before the search

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), gridspec_kw={"height_ratios": [3, 1]})
    steps = range(len(prof.ops))
    act = [op.live_activation_bytes / GiB for op in prof.ops]
    model_dev = pred.model_device_bytes / GiB
    top.fill_between(steps, 0, model_dev, color="#4c72b0", alpha=0.6, label="device: model data")
    top.fill_between(steps, model_dev, [model_dev + a for a in act], color="#dd8452", alpha=0.6,
                     label="device: activations")
    top.axhline(hw.device_bytes / GiB, color="k", ls="--", lw=1, label="device memory")
    backward = next((i for i, op in enumerate(prof.ops) if op.phase == "backward"), None)
    if backward is not None:
        top.axvline(backward, color="grey", lw=1)
        top.text(backward, top.get_ylim()[1] * 0.95, " backward", color="grey")
    top.set_xlabel("operator of the profiled step")
    top.set_ylabel("device GiB")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"predicted step {pred.step_s:.3f} s; peak device {pred.device_bytes_peak / GiB:.1f} GiB, "
                  f"host {pred.host_bytes_peak / GiB:.1f} GiB")
    colors = {("resident", "device"): "#4c72b0", ("on demand", "device"): "#8172b2",
              ("on demand", "host"): "#55a868"}
    x = 0
    for placed in plan.chunks:
        key = ("resident" if placed.resident else "on demand", placed.param_home)
        bottom.bar(x, 1, width=1, color=colors[key], edgecolor="none")
        bottom.bar(x, -0.5, width=1, color="#c44e52" if placed.optim_home == "host" else "#4c72b0")
        x += 1
    bottom.set_yticks([0.5, -0.25], ["parameters", "optimizer"])
    bottom.set_xlabel("chunk (blue: device, purple: on demand from device, green: on demand from host; "
                      "optimizer red: host)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
