"""Several ranks (gloo, processes spawned here) train exactly like one process on the global batch.

The reference GPT is built without biases here: the key bias of attention gets a zero gradient in
exact arithmetic, so its gradient is pure rounding noise, which AdamW normalises into full-size
updates; a reduction in another order (ranks) then moves it by ~lr, which says nothing about
correctness. Llama has no biases. Gradients themselves are compared in test_gradients_match.
"""

import copy

import pytest
import torch
from dist import run_ranks, train_one_process, train_ranks

import elixir
from elixir.models import GPT, GPTConfig
from helpers import (
    PLANS,
    VOCAB,
    assert_close_rel,
    assert_params_close,
    batches,
    build,
    loss_of,
    make_plan,
)

STEPS = 5
# Gradients on N ranks are reduced in another order than on one process: they agree to ~3e-7. AdamW
# divides by sqrt(v) + eps, so elements whose gradient is below eps (1e-8 by default) move by an
# amount set by that rounding noise; eps=1e-6 keeps the comparison about the runtime, not the noise.
EPS = 1e-6
# With lr=1e-2 AdamW's m/sqrt(v) amplifies that noise ~300x where successive gradients cancel; at
# 1e-3 parameters still move by ~5e-3 in 5 steps, 10^4 times the tolerance: a wrong gradient shows.
LR = 1e-3


def build_model(family):
    if family == "gpt":
        torch.manual_seed(0)
        return GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False))
    return build(family)


def _parity(rank, world, family, kind, accumulate, clip):
    model = build_model(family)
    data = batches(STEPS, batch=8)
    clip = 0.5 if clip else None
    ref_losses, ref_params, ref_norms = train_one_process(model, data, lr=LR, eps=EPS, clip=clip)

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
    m, opt = elixir.wrap(m, opt, plan=make_plan(m, kind, opt))
    losses, norms = train_ranks(m, opt, data, rank, world, micro_batches=2 if accumulate else 1, clip=clip)
    params = elixir.full_state_dict(m)
    assert_close_rel(losses, ref_losses, 1e-5)
    assert_params_close(params, ref_params, 1e-5)
    if clip is not None:
        assert_close_rel(norms, ref_norms, 1e-5)


def _all_plans(rank, world, family, kinds):
    # one spawn runs every case: starting ranks costs more than the cases themselves
    for kind in kinds:
        _parity(rank, world, family, kind, False, False)
    _parity(rank, world, family, "mixed", True, True)  # accumulation and clipping across ranks


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_gpt_matches_one_process_under_every_plan(world):
    run_ranks(_all_plans, world, "gpt", PLANS)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_llama_matches_one_process(world):
    run_ranks(_all_plans, world, "llama", ("resident", "on_demand", "host"))


def _memory(rank, world, results):
    model = build_model("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, fused=True)
    plan = make_plan(model, "host", opt)
    model, opt = elixir.wrap(model, opt, plan=plan)
    loss_of(model, batches(1, batch=world * 2)[0].chunk(world)[rank]).backward()
    opt.step()
    opt.zero_grad()
    rt = elixir.runtime_of(model)
    shard_numel = sum(c.numel // world for c in rt.chunks)
    stats = elixir.memory_stats(model)
    # host: fp32 parameter shard (its own master) + AdamW's two states, all sharded, and the gradient
    # buffers kept from step to step (fp32 shards too, where a gradient was copied rather than adopted)
    assert stats["host_grad_bytes"] in (0, 4 * shard_numel)
    assert stats["host_bytes"] - stats["host_grad_bytes"] == 3 * 4 * shard_numel
    results.put((world, rank, stats["host_bytes"] - stats["host_grad_bytes"], sum(c.numel for c in rt.chunks)))


@pytest.mark.dist
def test_model_data_per_rank_falls_as_one_over_n():
    import torch.multiprocessing as mp

    q = mp.get_context("spawn").SimpleQueue()
    _memory(0, 1, q)  # one rank: no process group at all
    for world in (2, 4):
        run_ranks(_memory, world, q)
    per_world = {}
    while not q.empty():
        world, rank, host_bytes, padded_total = q.get()
        per_world.setdefault(world, set()).add((host_bytes, padded_total))
    assert sorted(per_world) == [1, 2, 4]
    for world, rows in per_world.items():
        assert len(rows) == 1, f"ranks of world {world} hold different amounts: {rows}"
        host_bytes, padded_total = rows.pop()
        # exactly 1/N of the chunks (padded to a multiple of N) per rank
        assert host_bytes == 3 * 4 * padded_total // world
        per_world[world] = host_bytes
    padding = 3 * 4 * 4 * len(build_model("gpt").state_dict())  # at most N-1 elements per chunk
    assert per_world[2] <= per_world[1] / 2 + padding
    assert per_world[4] <= per_world[1] / 4 + padding


def _shared_vs_sockets(rank, world):
    import os
    import time

    from elixir.runtime.wrap import runtime_of
    from elixir.shm import SharedArena

    model = build_model("gpt")
    data = batches(3, batch=8)
    runs = {}
    slow_peer = SharedArena.peer

    def slow(self, *args):  # rank 1 reads late: rank 0 must not write what rank 1 has yet to read
        time.sleep(0.02)
        return slow_peer(self, *args)

    for shm in ("1", "slow", "0"):
        os.environ["ELIXIR_SHM"] = "0" if shm == "0" else "1"
        SharedArena.peer = slow if shm == "slow" and rank == 1 else slow_peer
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
        m, opt = elixir.wrap(m, opt, plan=make_plan(m, "mixed", opt))
        # the parity tests above run this way (shared memory, the default on one host)
        assert (runtime_of(m).tracker.shared is not None) == (shm != "0")
        losses = []
        for x in data:
            loss = loss_of(m, x.chunk(world)[rank])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[shm] = (losses, elixir.full_state_dict(m))
    os.environ.pop("ELIXIR_SHM")
    SharedArena.peer = slow_peer
    (l1, p1), (l0, p0), (ls, ps) = runs["1"], runs["0"], runs["slow"]
    assert ls == l1
    assert all(torch.equal(ps[n], p1[n]) for n in p1)
    if world == 2:  # a sum of two is the same in either order: the same bits
        assert l1 == l0
        assert all(torch.equal(p1[n], p0[n]) for n in p0)
    else:
        assert_close_rel(l1, l0, 1e-6)
        assert_params_close(p1, p0, 1e-6)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_shared_memory_and_sockets_train_alike(world):
    run_ranks(_shared_vs_sockets, world)
