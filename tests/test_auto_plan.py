"""plan="auto" (the default of elixir.wrap): planned from the first forward, or from example_batch."""

import copy
import dataclasses

import pytest
import torch
from dist import run_ranks

import elixir
from elixir.hardware import Hardware
from helpers import assert_close_rel, assert_params_close, batches, build, loss_of

STEPS = 5


def small_device(model, batch) -> Hardware:
    """A CPU whose "device" holds the activations and a third of the model's training state: the
    plan must offload."""
    prof = elixir.profile(model, {"input_ids": batch, "labels": batch})
    state = sum(p.numel() for p in model.parameters()) * 16  # fp32 parameter, gradient, Adam states
    hw = Hardware.preset("CPU").with_memory(device_bytes=int((prof.peak_activation_bytes + state // 3) / 0.9))
    return dataclasses.replace(hw, collective_bytes_per_s={2: 1e9})


def reference(model, data, **adamw):
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), **({"lr": 1e-2} | adamw), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    losses = []
    for x in data:
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def test_the_first_forward_plans_and_training_matches_pytorch():
    model = build("gpt")
    data = batches(STEPS)
    want, want_params = reference(model, data)
    # an optimizer built before (torch then wraps the class's step in its hooks, which must find the
    # pending optimizer's hook registries and reach its clear error)
    other = copy.deepcopy(model)
    elixir.wrap(other, torch.optim.AdamW(other.parameters()), plan=elixir.Plan.uniform(other))
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    m, opt = elixir.wrap(m, opt, hardware=small_device(model, data[0]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))  # made before any chunk exists
    stats = elixir.memory_stats(m)
    assert stats["device_bytes"] == 0 and stats["num_chunks"] == 0  # nothing allocated yet
    opt.zero_grad()  # harmless before the first forward
    with pytest.raises(ValueError, match="forward"):
        opt.step()
    steps_seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: steps_seen.append(1))  # registered while pending
    losses = []
    for x in data:
        loss = loss_of(m, x)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    plan = elixir.plan_of(m)
    assert plan.predicted and plan.use_order, "the plan was not searched from a profile"
    assert not all(c.resident and c.optim_home == "device" for c in plan.chunks), "nothing was offloaded"
    assert elixir.memory_stats(m).keys() == stats.keys()
    assert len(steps_seen) == STEPS, "a hook registered before the first forward was dropped"
    assert_close_rel(losses, want, 1e-5)
    assert_params_close(elixir.full_state_dict(m), want_params, 1e-5)


def test_example_batch_plans_at_wrap_time():
    model = build("gpt")
    data = batches(STEPS)
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    hw = small_device(model, data[0])
    m, opt = elixir.wrap(m, opt, example_batch={"input_ids": data[0], "labels": data[0]}, hardware=hw)
    assert elixir.memory_stats(m)["num_chunks"] > 0
    assert elixir.plan_of(m).predicted


def test_needing_the_chunks_before_a_forward_uses_the_default_plan(tmp_path):
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = elixir.wrap(model, opt, hardware=Hardware.preset("CPU"))
    elixir.save(model, opt, tmp_path / "ck")  # needs the chunks: made now, every chunk resident
    plan = elixir.plan_of(model)
    assert all(c.resident for c in plan.chunks) and not plan.predicted
    loss_of(model, batches(1)[0]).backward()  # and no second planning at the first forward
    assert elixir.plan_of(model) is plan


def test_a_first_forward_the_planner_cannot_read_is_refused():
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = elixir.wrap(model, opt, hardware=Hardware.preset("CPU"))
    x = batches(1)[0]
    with pytest.raises(ValueError, match="example_batch"):
        model(x, x)


def _ranks_agree(rank, world):
    from elixir.models import GPT, GPTConfig

    torch.manual_seed(0)  # bias-free, eps and lr as in test_distributed (its docstring says why)
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, bias=False))
    data = batches(STEPS, batch=8)
    want, want_params = reference(model, data, lr=1e-3, eps=1e-6)
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, fused=True)
    # ranks that measured different machines still take rank 0's plan
    hw = small_device(model, data[0].chunk(world)[0]) if rank == 0 else Hardware.preset("A100-80GB")
    m, opt = elixir.wrap(m, opt, hardware=hw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    losses = []
    for x in data:
        loss = loss_of(m, x.chunk(world)[rank])
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    plan = elixir.plan_of(m)
    plans = [None] * world
    torch.distributed.all_gather_object(plans, plan.to_json())
    assert len(set(plans)) == 1
    assert not all(c.resident and c.optim_home == "device" for c in plan.chunks)
    assert_close_rel(losses, want, 1e-5)
    assert_params_close(elixir.full_state_dict(m), want_params, 1e-5)


@pytest.mark.dist
def test_every_rank_takes_rank_zeros_plan():
    run_ranks(_ranks_agree, 2)
