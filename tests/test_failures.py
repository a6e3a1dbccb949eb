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


@pytest.mark.dist
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


@pytest.mark.dist
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
    from elixir.checkpoint.manifest import read_manifest

    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        assert file_digest(os.path.join(path, name)) == (info["bytes"], info["sha256"]), name
    assert manifest["optimizer"]["steps"] == 1



def _dying_rank(rank, world, port, where, path, results):
    """Rank 1 dies in the middle of `where`: an expert-parallel all-to-all, elixir.load, or the planning of
    the first forward (plan="auto"); rank 0 must fail with a CollectiveError naming the collective."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    elixir.init_distributed(timeout_s=TIMEOUT_S)
    from elixir.models import GPT, GPTConfig

    torch.manual_seed(0)
    x = batches(1, batch=2 * world)[0].chunk(world)[rank]
    started = time.monotonic()
    try:
        if where == "moe":
            model = GPT(GPTConfig.preset("tiny", vocab_size=64, bias=False, n_experts=4, expert_hidden=32)).train()
            elixir.parallel.expert_parallel(model, 2)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            model, opt = elixir.wrap(model, opt, plan=make_plan(model, "resident", opt))
            if rank == 1:
                model.h[1].mlp.experts.register_forward_pre_hook(lambda m, a: os._exit(3))
            started = time.monotonic()
            loss_of(model, x).backward()
        elif where == "load":
            model, opt = _join_and_wrap(rank, world, port)
            loss_of(model, x).backward()
            opt.step()
            elixir.save(model, opt, path)
            if rank == 1:
                from elixir.checkpoint import store

                store._fill_chunk = lambda *a: os._exit(3)
            started = time.monotonic()
            elixir.load(model, opt, path)
        else:  # the first forward plans on rank 0, which tells every rank its plan; rank 1 is gone by then
            from elixir.hardware import Hardware

            model = build("gpt")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            model, opt = elixir.wrap(model, opt, hardware=Hardware.preset("CPU"))
            if rank == 1:
                os._exit(3)
            started = time.monotonic()
            loss_of(model, x).backward()
    except elixir.CollectiveError as e:
        results.put((rank, "CollectiveError", str(e), time.monotonic() - started))
        os._exit(0)
    results.put((rank, "finished", "", time.monotonic() - started))


@pytest.mark.dist
def test_a_rank_dying_in_an_all_to_all_a_load_or_the_planning_is_named(tmp_path):
    cases = {"moe": "all-to-all", "load": "elixir.load", "plan": "broadcast of rank 0's plan"}
    ctx = mp.get_context("spawn")
    runs = {}
    for where in cases:  # three pairs of ranks at once: each waits mostly for its timeout
        results, port = ctx.SimpleQueue(), free_port()
        procs = [ctx.Process(target=_dying_rank, args=(r, 2, port, where, str(tmp_path / where), results))
                 for r in (0, 1)]
        for p in procs:
            p.start()
        runs[where] = (procs, results)
    for where, (procs, results) in runs.items():
        procs[0].join(timeout=TIMEOUT_S * 6 + 90)
        hung = procs[0].is_alive()
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        assert not hung, f"{where}: rank 0 hung instead of failing"
        got = []
        while not results.empty():
            got.append(results.get())
        assert [(r[0], r[1]) for r in got] == [(0, "CollectiveError")], (where, got)
        assert cases[where] in got[0][2] and got[0][3] < TIMEOUT_S * 3 + 10, (where, got[0])
