"""Bad input at the API: a clear error or a documented behaviour each, and the wrapped model still works
afterwards (no pin, hook stack or speculation left half-done)."""

import copy
import dataclasses
import os

import pytest
import torch

import elixir
from elixir.hardware import Hardware
from helpers import batches, build, loss_of, make_plan


def _wrapped(kind="on_demand", overlap=True):
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    plan = dataclasses.replace(make_plan(model, kind, opt), overlap=overlap)
    return elixir.wrap(model, opt, plan=plan)


def _train_step(model, opt, x):
    loss = loss_of(model, x)
    opt.backward(loss)
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("kind", ["on_demand", "resident"])
def test_a_batch_of_the_wrong_dtype_is_the_models_own_error_and_the_model_goes_on(kind):
    model, opt = _wrapped(kind)
    x = batches(2)
    with pytest.raises(RuntimeError, match="Long|Int|indices"):  # the embedding's own message
        loss_of(model, x[0].float())
    rt = elixir.runtime_of(model)
    assert all(c.pins == 0 for c in rt.chunks)  # the failed forward left nothing pinned
    ref = _wrapped(kind)
    assert _train_step(model, opt, x[1]) == _train_step(*ref, x[1])  # and trains as a fresh one does


def _boom(grad):
    raise RuntimeError("a hook of the user's failed")


@pytest.mark.parametrize("kind", ["on_demand", "resident", "host"])
def test_an_exception_in_the_middle_of_backward_leaves_the_runtime_usable(kind):
    """Autograd runs no end-of-backward callback after an error: the next zero_grad finishes that backward
    (pins released, updates made inside it undone), and training goes on as a fresh model's would."""
    model, opt = _wrapped(kind)
    x = batches(2)
    handle = model.h[0].mlp.c_fc.weight.register_hook(_boom)  # layer 0: late in backward, after other updates
    with pytest.raises(RuntimeError, match="a hook of the user's failed"):
        opt.backward(loss_of(model, x[0]))
    handle.remove()
    opt.zero_grad()  # drops what that backward left
    rt = elixir.runtime_of(model)
    assert not rt.in_backward and all(c.pins == 0 for c in rt.chunks)
    assert all(c.master is None or c.master.grad is None for c in rt.chunks)
    stats = elixir.step_stats(model)
    if stats["speculated_steps"]:
        assert stats["rollback_reasons"].get("abandoned") == 1
    ref = _wrapped(kind)
    assert _train_step(model, opt, x[1]) == _train_step(*ref, x[1])
    assert _train_step(model, opt, x[0]) == _train_step(*ref, x[0])


def test_a_step_after_a_failed_backward_applies_its_partial_gradients_as_pytorch_does():
    x = batches(2)
    ref = build("gpt")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    model, opt = _wrapped("on_demand")
    for m, o, backward in ((ref, ref_opt, lambda loss: loss.backward()), (model, opt, opt.backward)):
        handle = m.h[0].mlp.c_fc.weight.register_hook(_boom)
        with pytest.raises(RuntimeError, match="a hook of the user's failed"):
            backward(loss_of(m, x[0]))
        handle.remove()
        o.step()  # the gradients that backward computed before it failed, and none of the others
        o.zero_grad()
    got, want = elixir.full_state_dict(model), ref.state_dict()
    moved = [n for n in want if not torch.equal(want[n], build("gpt").state_dict()[n])]
    assert moved and "h.0.mlp.c_fc.weight" not in moved  # partial: later layers moved, the failed one not
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    ref_loss = loss_of(ref, x[1])
    ref_loss.backward()
    ref_opt.step()
    assert _train_step(model, opt, x[1]) == pytest.approx(ref_loss.item(), rel=1e-5)


def test_a_batch_larger_than_planned_warns_once():
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    small = batches(1, batch=2, seq=16)[0]
    plan = elixir.plan(model, {"input_ids": small, "labels": small}, hardware=Hardware.preset("CPU"))
    assert plan.predicted["batch_tokens"] == 32
    model, opt = elixir.wrap(model, opt, plan=plan)
    _train_step(model, opt, small)  # as planned: quiet
    big = batches(1, batch=4, seq=32)[0]
    with pytest.warns(UserWarning, match="this batch has 128 tokens .* the plan was made for 32"):
        _train_step(model, opt, big)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        _train_step(model, opt, big)


def test_step_without_backward_changes_nothing():
    """As in PyTorch: parameters without a gradient are not updated; the step is counted."""
    model, opt = _wrapped("mixed")
    before = elixir.full_state_dict(model)
    opt.step()
    opt.step()
    after = elixir.full_state_dict(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert opt.steps == 2 and not opt.state
    _train_step(model, opt, batches(1)[0])  # and a real step afterwards works


def test_the_model_after_a_failed_load_is_unchanged_and_trains(tmp_path):
    model, opt = _wrapped("mixed")
    x = batches(3)
    _train_step(model, opt, x[0])
    elixir.save(model, opt, tmp_path / "ck")
    _train_step(model, opt, x[1])
    before = elixir.full_state_dict(model)
    shard = next(p for p in (tmp_path / "ck").iterdir() if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte: the sha256 no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(elixir.CheckpointError, match=os.path.basename(shard)):
        elixir.load(model, opt, tmp_path / "ck")
    after = elixir.full_state_dict(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert opt.steps == 2
    ref = copy.deepcopy(before)
    assert _train_step(model, opt, x[2]) > 0 and ref.keys() == elixir.full_state_dict(model).keys()


def test_shard_over_is_checked_and_applies_to_searched_plans_only():
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="shard_over='nodes'.*'auto', 'world' or 'node'"):
        elixir.wrap(model, opt, shard_over="nodes")
    with pytest.raises(ValueError, match="shard_over='node' chooses the layout of a searched plan"):
        elixir.wrap(model, opt, plan=make_plan(model, "resident", opt), shard_over="node")
    x = batches(1)[0]
    wrapped, _ = elixir.wrap(model, opt, example_batch={"input_ids": x, "labels": x}, shard_over="world",
                             hardware=Hardware.preset("A100-40GB"), device="cpu")
    assert {c.shard_over for c in elixir.plan_of(wrapped).chunks} == {"world"}
