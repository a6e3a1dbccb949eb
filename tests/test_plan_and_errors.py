"""Plans (JSON, validation) and the errors of wrap(): raised before anything is allocated."""

import copy
import dataclasses
import math

import pytest
import torch

import elixir
from elixir.memory import EvictionSchedule
from helpers import batches, build, loss_of, make_plan


def test_plan_json_round_trip():
    model = build("gpt")
    plan = make_plan(model, "mixed", dtype=torch.bfloat16)
    again = elixir.Plan.from_json(plan.to_json())
    assert again == plan
    assert again.dtype == torch.bfloat16
    assert "on demand" in plan.summary()


def test_uniform_plan_packs_every_parameter_once_in_order():
    model = build("llama")
    plan = elixir.Plan.uniform(model, chunk_mib=0.01, resident=False, cache_blocks=2)
    names = [n for c in plan.chunks for n in c.params]
    assert names == [n for n, _ in model.named_parameters()]
    for c in plan.chunks:
        assert plan.chunk_used_numel(c) <= plan.chunk_numel


def _unwrapped_intact(model):
    return all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())


def test_plan_for_another_model_is_refused_before_allocating():
    plan = make_plan(build("gpt"), "on_demand")
    other = build("llama")
    opt = torch.optim.AdamW(other.parameters())
    expected = "made for another model: 'h.0.attn.c_attn.bias' is in the plan but not in the model.*and 44 more"
    with pytest.raises(ValueError, match=expected):
        elixir.wrap(other, opt, plan=plan)
    assert _unwrapped_intact(other)
    with pytest.raises(ValueError, match="not wrapped"):
        elixir.plan_of(other)


def test_plan_with_another_shape_says_which():
    small = build("gpt")
    plan = make_plan(small, "resident")
    from elixir.models import GPT, GPTConfig

    wider = GPT(GPTConfig.preset("tiny", vocab_size=64, n_embd=64))
    with pytest.raises(ValueError, match=r"'h.0.attn.c_attn.bias' has shape \[192\] in the model, \[96\] in the plan"):
        elixir.wrap(wider, torch.optim.AdamW(wider.parameters()), plan=plan)


def test_plan_for_another_world_size():
    model = build("gpt")
    plan = dataclasses.replace(make_plan(model, "resident"), world_size=2)
    with pytest.raises(ValueError, match="world_size=2 but this run has 1 ranks"):
        elixir.wrap(model, torch.optim.AdamW(model.parameters()), plan=plan)


def test_chunk_too_small_for_the_largest_parameter():
    model = build("gpt")
    expected = r"cannot hold parameter 'h.0.mlp.c_fc.weight' of 4096 elements; use chunk_mib >= 0.01562"
    with pytest.raises(ValueError, match=expected):
        elixir.Plan.uniform(model, chunk_mib=0.001)
    plan = make_plan(model, "on_demand")
    with pytest.raises(ValueError, match="needs .* elements but chunk_numel is 100"):
        dataclasses.replace(plan, chunk_numel=100)


def test_cache_too_small_for_a_module():
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters())
    # one chunk per parameter: a Linear's weight and bias land in two chunks
    mib = max(p.numel() for p in model.parameters()) * 4 / 2**20
    plan = elixir.Plan.uniform(model, chunk_mib=mib, resident=False, cache_blocks=1, optimizer=opt)
    with pytest.raises(ValueError, match=r"cache_blocks=1 is too small: module '.*' uses parameters from 2"):
        elixir.wrap(model, opt, plan=plan)
    assert _unwrapped_intact(model)
    with pytest.raises(ValueError, match="need a cache of at least one block"):
        elixir.Plan.uniform(model, chunk_mib=mib, resident=False, cache_blocks=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(compute_dtype="fp8"), "compute_dtype='fp8' is not supported; use one of float32, bfloat16, float16"),
        (dict(compute_dtype=torch.int8), "is not supported"),
        (dict(param_home="gpu"), "param_home='gpu' is not a memory tier; use 'device', 'host' or 'disk'"),
        (dict(optim_home="nvme"), "optim_home='nvme' is not a memory tier"),
        (dict(resident=True, param_home="host"), "resident=True keeps the whole chunk on the device"),
        (dict(chunk_mib=-1), "chunk_mib=-1 must be positive"),
    ],
)
def test_bad_knobs(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        elixir.Plan.uniform(build("gpt"), **kwargs)


def test_non_elementwise_optimizer_is_refused():
    model = build("gpt")
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="LBFGS is not supported"):
        elixir.wrap(model, opt, plan=make_plan(model, "resident"))
    assert _unwrapped_intact(model)


def test_optimizer_of_another_model_is_refused():
    model = build("gpt")
    opt = torch.optim.AdamW(build("gpt").parameters())
    with pytest.raises(ValueError, match="not a parameter of the model"):
        elixir.wrap(model, opt, plan=make_plan(model, "resident"))


def test_wrapping_twice_is_refused():
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters())
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, "resident"))
    with pytest.raises(ValueError, match="already wrapped"):
        elixir.wrap(model, opt)


def test_auto_plan_made_before_any_forward_is_resident_and_trains():
    # runtime_of needs the chunks before the first forward could plan: the default plan is used
    model = build("gpt")
    m = copy.deepcopy(model)
    m, opt = elixir.wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2))
    assert all(c.resident for c in elixir.runtime_of(m).chunks)
    for x in batches(2):
        loss_of(m, x).backward()
        opt.step()
        opt.zero_grad()


# --- the eviction schedule ----------------------------------------------------------------------


def test_schedule_follows_the_recorded_order_with_farthest_next_use():
    s = EvictionSchedule()
    s.start_forward()
    for c in [0, 1, 2, 1, 0]:
        s.use(c)
    s.saw_backward()
    s.end_backward()
    assert s.order == [0, 1, 2, 1, 0]
    s.start_forward()
    s.use(0)
    s.use(1)
    assert s.cursor == 1
    assert s.next_use(0) == 4 and s.next_use(1) == 3 and s.next_use(2) == 2
    assert s.upcoming(2) == [2, 1]
    s.use(7)  # the run leaves the order: least-recently-used until the next step
    assert not s.on_order and s.left_order == 1 and s.upcoming(2) == []
    s.start_forward()
    assert s.on_order
    s.use(0)
    assert s.next_use(2) == 2 and s.next_use(9) == math.inf


def test_forward_without_backward_is_not_taken_as_the_order():
    s = EvictionSchedule()
    s.start_forward()
    s.use(3)
    s.start_forward()  # e.g. an evaluation forward: record again
    s.use(0)
    s.saw_backward()
    s.end_backward()
    assert s.order == [0]


def test_data_dependent_control_flow_falls_back_and_keeps_training():
    """A forward that uses chunks in another order than recorded still trains correctly."""

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 32)
            self.a = torch.nn.Linear(32, 32)
            self.b = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 64)

        def forward(self, input_ids, labels=None):
            h = self.emb(input_ids)
            h = self.b(self.a(h)) if int(input_ids[0, 0]) % 2 else self.a(self.b(h))
            loss = torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())
            return type("Out", (), {"loss": loss})

    from helpers import assert_params_close, train_reference

    torch.manual_seed(0)
    model = Branchy()
    data = [torch.full((2, 8), i) for i in range(1, 6)]
    _, ref_params = train_reference(model, data, 5)
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    plan = elixir.Plan.uniform(m, chunk_mib=2048 * 4 / 2**20 * 1.1, resident=False, cache_blocks=2, optimizer=opt)
    m, opt = elixir.wrap(m, opt, plan=plan)
    for x in data:
        loss_of(m, x).backward()
        opt.step()
        opt.zero_grad()
    assert_params_close(elixir.full_state_dict(m), ref_params, 1e-5)
