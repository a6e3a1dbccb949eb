"""PEFT/LoRA adapters on a model wrapped by Elixir, in a plain loop: the frozen base lives in chunks without
masters, optimizer states or gradients, the adapters train as under plain PEFT, the planner places the frozen
chunks, and `save_pretrained` writes the adapter. (Under the Hugging Face Trainer, on one and two ranks with
checkpoints that resume on the other rank count: test_integration_hf.py.)"""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import elixir  # noqa: E402
from elixir.hardware import Hardware  # noqa: E402
from helpers import assert_close_rel, assert_params_close, batches, loss_of, make_plan, tiny_hf  # noqa: E402

STEPS, LR, EPS = 5, 1e-3, 1e-6
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(tiny_hf("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero; values make every adapter weight take part from step one
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def optimizer_of(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)


def train(model, opt, data, wrapped: bool) -> list[float]:
    losses = []
    for x in data:
        loss = loss_of(model, x)
        opt.backward(loss) if wrapped else loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def adapter_values(model, wrapped: bool) -> dict[str, torch.Tensor]:
    values = elixir.full_state_dict(model) if wrapped else {n: p.detach() for n, p in model.named_parameters()}
    return {n: v for n, v in values.items() if "lora_" in n}


@pytest.fixture(scope="module")
def plain():
    model = lora_model()
    data = batches(STEPS)
    losses = train(model, optimizer_of(model), data, wrapped=False)
    return losses, adapter_values(model, wrapped=False), model


def searched_plan(model, opt, data):
    return elixir.plan(model, {"input_ids": data[0], "labels": data[0]}, hardware=Hardware.preset("CPU"))


@pytest.mark.parametrize("plan_kind", ["host", "on_demand", "searched"])
def test_lora_on_a_wrapped_model_trains_as_plain_peft(plain, plan_kind):
    ref_losses, ref_adapter, _ = plain
    model, data = lora_model(), batches(STEPS)
    opt = optimizer_of(model)
    plan = searched_plan(model, opt, data) if plan_kind == "searched" else make_plan(model, plan_kind, opt)
    model, opt = elixir.wrap(model, opt, plan=plan)
    losses = train(model, opt, data, wrapped=True)
    assert_close_rel(losses, ref_losses, 1e-6)
    assert_params_close(adapter_values(model, wrapped=True), ref_adapter, 1e-5)


def test_frozen_base_chunks_hold_no_optimizer_state(plain):
    """The planner's plan for a LoRA model: the base's chunks are frozen (no master, no states), and the
    optimizer's bytes are the adapters' alone, as the plan predicted."""
    model, data = lora_model(), batches(1)
    opt = optimizer_of(model)
    plan = searched_plan(model, opt, data)
    model, opt = elixir.wrap(model, opt, plan=plan)
    train(model, opt, data, wrapped=True)
    chunks = elixir.runtime_of(model).chunks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for c in chunks:
        names = {s.name for s in c.slots}
        assert names <= trainable or not names & trainable, "frozen and trained parameters share a chunk"
        assert (c.master is not None) == bool(names & trainable)
    adapter_numel = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    state_numel = sum(v.numel() for s in opt.state.values() for v in s.values() if v.numel() > 1)
    padded = sum(c.shard_numel for c in chunks if c.master is not None)
    assert adapter_numel <= state_numel // 2 <= padded  # AdamW's two states, of the adapters' chunks only
    base_numel = sum(p.numel() for n, p in model.named_parameters() if n not in trainable)
    assert state_numel < base_numel  # nothing of the sort for the frozen base


def test_save_pretrained_writes_the_trained_adapter(plain, tmp_path):
    _, ref_adapter, plain_model = plain
    model, data = lora_model(), batches(STEPS)
    opt = optimizer_of(model)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, "host", opt))
    train(model, opt, data, wrapped=True)
    model.save_pretrained(tmp_path / "adapter")  # on-demand chunks: their state dict gathers the values
    plain_model.save_pretrained(tmp_path / "plain")
    got = PeftModel.from_pretrained(tiny_hf_base(), tmp_path / "adapter").state_dict()
    want = PeftModel.from_pretrained(tiny_hf_base(), tmp_path / "plain").state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert_close_rel(got[name], want[name], 1e-5)
    # and the adapter as trained, by its own names
    trained = adapter_values(model, wrapped=True)
    loaded = {n: v for n, v in got.items() if "lora_" in n}
    assert len(loaded) == len(trained)
    for name, value in trained.items():
        assert torch.equal(loaded[name], value)


def tiny_hf_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_hf("llama")
