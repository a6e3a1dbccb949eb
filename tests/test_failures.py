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


def _join_and_wrap(rank, world, port):
    """Join a gloo group of `world` ranks with the short timeout, and wrap the tiny GPT on demand."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    elixir.init_distributed(timeout_s=TIMEOUT_S)
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return elixir.wrap(model, opt, plan=make_plan(model, "on_demand", opt))


def _rank(rank, world, port, fault, results):
    model, opt = _join_and_wrap(rank, world, port)
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


def _run_two_ranks(target, *args):
    """Run `target(rank, 2, port, *args, results)` on two processes; fail if rank 0 hangs (rank 1 is
    killed if it is still alive then). Returns the results queue."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, *args, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    procs[0].join(timeout=TIMEOUT_S * 6 + 60)
    alive = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not alive, "rank 0 hung instead of failing"
    return results


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_peer_failure_is_a_named_error_within_the_timeout(fault):
    results = _run_two_ranks(_rank, fault)
    rank, kind, message, waited = results.get()
    assert (rank, kind) == (0, "CollectiveError"), (rank, kind, message)
    assert "a peer rank exited or did not answer within the timeout (5 s" in message
    assert "of chunk" in message  # says what was being moved
    assert waited < TIMEOUT_S * 3 + 10



def _save_rank(rank, world, port, path, results):
    model, opt = _join_and_wrap(rank, world, port)
    x = batches(1, batch=2 * world)[0].chunk(world)[rank]
    loss_of(model, x).backward()
    opt.step()
    elixir.save(model, opt, path)  # the good checkpoint
    results.put((rank, "saved", "", 0.0))
    loss_of(model, x).backward()
    opt.step()
    if rank == 1:
        from elixir.checkpoint.files import StreamWriter

        def die(self, name, tensor):
            os._exit(3)  # the process is killed while it writes its shard file

        StreamWriter.write = die
    started = time.monotonic()
    try:
        elixir.save(model, opt, path)
    except elixir.CollectiveError as e:
        results.put((rank, "CollectiveError", str(e), time.monotonic() - started))
        os._exit(0)
    results.put((rank, "finished", "", time.monotonic() - started))


def test_a_rank_dying_during_a_save_fails_the_others_and_keeps_the_last_checkpoint(tmp_path):
    from elixir.checkpoint.files import file_digest

    path = str(tmp_path / "ck")
    results = _run_two_ranks(_save_rank, path)
    got = []
    while not results.empty():
        got.append(results.get())
    failures = [r for r in got if r[1] != "saved"]
    assert [(r[0], r[1]) for r in failures] == [(0, "CollectiveError")], got
    assert "elixir.save" in failures[0][2] and failures[0][3] < TIMEOUT_S * 3 + 10
    # the checkpoint of the first save is complete and verifies
    from elixir.checkpoint.store import read_manifest

    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        assert file_digest(os.path.join(path, name)) == (info["bytes"], info["sha256"]), name
    assert manifest["optimizer"]["steps"] == 1

