"""Several ranks (gloo, processes spawned here) train exactly like one process on the global batch.

The reference GPT is built without biases here: the key bias of attention gets a zero gradient in
exact arithmetic, so its gradient is pure rounding noise, which AdamW normalises into full-size
updates; a reduction in another order (ranks) then moves it by ~lr, which says nothing about
correctness. Llama has no biases. Gradients themselves are compared in test_gradients_match.
"""

import copy

import pytest
import torch
from dist import run_ranks

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
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=EPS, fused=True)
    ref_losses, ref_norms = [], []
    for x in data:
        loss = loss_of(ref, x)
        loss.backward()
        if clip:
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5).item())
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(loss.item())

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
    m, opt = elixir.wrap(m, opt, plan=make_plan(m, kind, opt))
    losses, norms = [], []
    for x in data:
        local = x.chunk(world)[rank]  # this rank's rows of the global batch
        micro = local.chunk(2) if accumulate else [local]
        total = torch.zeros(())
        for part in micro:
            loss = loss_of(m, part) / len(micro)
            loss.backward()
            total += loss.detach()
        if clip:
            norms.append(opt.clip_grad_norm_(0.5).item())
        opt.step()
        opt.zero_grad()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    params = elixir.full_state_dict(m)
    assert_close_rel(losses, ref_losses, 1e-5)
    assert_params_close(params, {n: p.detach() for n, p in ref.named_parameters()}, 1e-5)
    if clip:
        assert_close_rel(norms, ref_norms, 1e-5)


def _all_plans(rank, world, family, kinds):
    # one spawn runs every case: starting ranks costs more than the cases themselves
    for kind in kinds:
        _parity(rank, world, family, kind, False, False)
    _parity(rank, world, family, "mixed", True, True)  # accumulation and clipping across ranks


@pytest.mark.parametrize("world", [2, 4])
def test_gpt_matches_one_process_under_every_plan(world):
    run_ranks(_all_plans, world, "gpt", PLANS)


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
    # host: fp32 parameter shard (its own master) + AdamW's two states, all sharded
    assert stats["host_bytes"] == 3 * 4 * shard_numel
    results.put((world, rank, stats["host_bytes"], sum(c.numel for c in rt.chunks)))


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
