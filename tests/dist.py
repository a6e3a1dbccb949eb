"""Run a test body on several gloo ranks spawned on this machine."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
