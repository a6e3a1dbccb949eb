"""A rank that dies or hangs mid-step makes the others fail with a named error within the timeout."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from dist import free_port

import elixir
from helpers import batches, build, loss_of, make_plan

TIMEOUT_S = 5.0


def _rank(rank, world, port, fault, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    elixir.init_distributed(timeout_s=TIMEOUT_S)
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, "on_demand", opt))
    if rank == 1:
        def fail(module, args):
            if fault == "dies":
                os._exit(3)
            time.sleep(3600)  # hangs

        model.h[1].register_forward_pre_hook(fail)  # mid-forward of the first step
    x = batches(1, batch=2 * world)[0].chunk(world)[rank]
    started = time.monotonic()
    try:
        for _ in range(3):
            loss_of(model, x).backward()
            opt.step()
            opt.zero_grad()
    except elixir.CollectiveError as e:
        results.put((rank, "CollectiveError", str(e), time.monotonic() - started))
        os._exit(0)  # leave without tearing the broken group down
    results.put((rank, "finished", "", time.monotonic() - started))


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_peer_failure_is_a_named_error_within_the_timeout(fault):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, fault, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    procs[0].join(timeout=TIMEOUT_S * 6 + 60)
    alive = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not alive, "rank 0 hung instead of failing"
    rank, kind, message, waited = results.get()
    assert (rank, kind) == (0, "CollectiveError"), (rank, kind, message)
    assert "a peer rank exited or did not answer within the timeout (5 s" in message
    assert "of chunk" in message  # says what was being moved
    assert waited < TIMEOUT_S * 3 + 10

