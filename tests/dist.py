"""Run a test body on several gloo ranks spawned on this machine, and the training loop such bodies share:
a wrapped model trained on each rank's rows of the global batches, and plain PyTorch on the whole batches
to compare it with."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import loss_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        fn(rank, world_size, *args)
        # every rank leaves together: a rank that tears its group down while a peer still talks
        # to it would fail the peer
        dist.barrier()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()
    # The body passed and the group is down. Under heavy load a spawned rank has now and then aborted in the
    # interpreter's teardown after this point ("terminate called without an active exception": a native
    # thread object destroyed while joinable, in a static destructor), which the test's body cannot see or
    # cause; leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; re-raise the first failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _entry, args=(world_size, free_port(), fn, args, errors), nprocs=world_size, start_method="spawn"
        )
    except mp.ProcessRaisedException:
        rank, tb = errors.get() if not errors.empty() else (None, "")
        raise AssertionError(f"rank {rank} failed:\n{tb}") from None


def train_ranks(model, opt, data, rank: int, world: int, *, micro_batches: int = 1, clip: float | None = None,
                opt_backward: bool = False) -> tuple[list[float], list[float]]:
    """Train the wrapped `model` one step per global batch of `data` on this rank's rows of it (of `world`
    ranks): `micro_batches` backward passes (each loss divided by their number), the gradient norm clipped to
    `clip` when given, `step`, `zero_grad`. `opt_backward` runs `opt.backward(loss)`, otherwise
    `loss.backward()`. Returns the loss of each global batch (the ranks' summed, over `world`: the same on
    every rank) and the norms `clip_grad_norm_` returned."""
    losses, norms = [], []
    for x in data:
        total = torch.zeros(())
        for part in x.chunk(world)[rank].chunk(micro_batches):
            loss = loss_of(model, part)
            if micro_batches > 1:
                loss = loss / micro_batches
            if opt_backward:
                opt.backward(loss)
            else:
                loss.backward()
            total += loss.detach()
        if clip is not None:
            norms.append(opt.clip_grad_norm_(clip).item())
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, norms


def train_one_process(model, data, *, lr: float, eps: float, clip: float | None = None):
    """What `train_ranks` is compared with: a copy of `model` trained by plain PyTorch (fused AdamW) on
    each whole batch of `data`, the gradient norm clipped to `clip` when given. Returns its losses, its
    parameters after the last step and the gradient norms."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, fused=True)
    losses, norms = [], []
    for x in data:
        loss = loss_of(model, x)
        loss.backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, norms
