"""A NaN or inf gradient in bf16 or fp32: refused with a named error by default (the model as before the step),
or skipped and counted; every rank decides alike. fp16 keeps its loss scaling (tests/test_runtime_features.py)."""

import copy
import dataclasses
import json

import pytest
import torch

import elixir
from elixir.models import GPT, GPTConfig
from helpers import VOCAB, batches, loss_of, make_plan


def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False)).train()


def _wrapped(kind="mixed", dtype=torch.float32, overlap=True, nonfinite="error"):
    m = gpt()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    plan = dataclasses.replace(make_plan(m, kind, opt, dtype=dtype), overlap=overlap)
    return elixir.wrap(m, opt, plan=plan, nonfinite=nonfinite)


def _poison(param: torch.nn.Parameter):
    """Make `param`'s gradient NaN in the next backward (only it)."""
    return param.register_hook(lambda g: torch.full_like(g, float("nan")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("clip", [True, False])
def test_a_nan_gradient_is_refused_by_name_and_leaves_the_model_as_it_was(dtype, overlap, clip):
    m, opt = _wrapped(dtype=dtype, overlap=overlap)
    x = batches(3)
    opt.backward(loss_of(m, x[0]))
    opt.step()
    opt.zero_grad()
    before = elixir.full_state_dict(m)
    states = {k: {s: v.clone() for s, v in st.items()} for k, st in opt.state.items()}
    handle = _poison(m.h[1].mlp.c_fc.weight)
    opt.backward(loss_of(m, x[1]))
    handle.remove()
    if clip:
        assert not torch.isfinite(opt.clip_grad_norm_(1.0))
    with pytest.raises(elixir.NonFiniteError, match=r"step 2: non-finite gradients \(first in parameter "
                                                    r"'h\.1\.mlp\.c_fc\.weight'"):
        opt.step()
    after = elixir.full_state_dict(m)
    tol = 0 if not overlap else 2e-6  # an update that ran inside backward was undone: fp32 rounding
    for n in before:
        err = ((after[n] - before[n]).abs().max() / before[n].abs().max()).item()
        assert err <= tol, n
    for k, st in opt.state.items():
        for s, v in st.items():
            ref = states[k][s]
            assert (v - ref).abs().max() <= 2e-6 * ref.abs().max(), s
    assert opt.steps == 1
    # the run can go on from there (after the user dealt with the cause)
    opt.backward(loss_of(m, x[2]))
    opt.step()
    assert opt.steps == 2


@pytest.mark.parametrize("overlap", [True, False])
def test_skip_policy_skips_and_counts(overlap):
    m, opt = _wrapped(dtype=torch.bfloat16, overlap=overlap, nonfinite="skip")
    x = batches(3)
    opt.backward(loss_of(m, x[0]))
    opt.step()
    opt.zero_grad()
    before = elixir.full_state_dict(m)
    opt.backward(loss_of(m, x[1]) * float("inf"))
    opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad()
    stats = elixir.step_stats(m)
    assert stats["nonfinite_steps"] == 1 and stats["skipped_steps"] == 1 and stats["steps"] == 2
    after = elixir.full_state_dict(m)
    assert all(torch.equal(before[n], after[n]) for n in before)  # every chunk's gradient was NaN: none ran
    opt.backward(loss_of(m, x[2]))
    opt.step()
    assert any(not torch.equal(before[n], v) for n, v in elixir.full_state_dict(m).items())


def test_the_policy_is_checked():
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        _wrapped(nonfinite="ignore")


def _ranks(rank, world, policies):
    for policy in policies:  # one spawn for both: starting ranks costs more than the cases
        _ranks_case(rank, world, policy)


def _ranks_case(rank, world, policy):
    m, opt = _wrapped(nonfinite=policy)
    x = batches(2, batch=8)
    handle = _poison(m.h[0].attn.c_proj.weight) if rank == 1 else None  # only rank 1's gradient
    opt.backward(loss_of(m, x[0].chunk(world)[rank]))
    if handle is not None:
        handle.remove()
    if policy == "error":
        with pytest.raises(elixir.NonFiniteError) as e:
            opt.step()
        # the reduced gradient carries rank 1's NaN into every rank's shards of that chunk
        assert "non-finite" in str(e.value)
    else:
        opt.step()
        assert elixir.step_stats(m)["nonfinite_steps"] == 1
    opt.zero_grad()
    opt.backward(loss_of(m, x[1].chunk(world)[rank]))
    opt.step()  # every rank goes on together


@pytest.mark.dist
def test_ranks_decide_alike():
    from dist import run_ranks

    run_ranks(_ranks, 2, ("error", "skip"))


def test_a_copy_of_a_model_is_not_needed_to_check():
    """The check reads the gradients once (a sum per chunk) and allocates nothing per step."""
    m, opt = _wrapped(dtype=torch.bfloat16)
    tracker = elixir.runtime_of(m).tracker
    counts = []
    for x in batches(5):
        opt.backward(loss_of(m, copy.deepcopy(x)))
        opt.step()
        opt.zero_grad()
        counts.append(tracker.allocations)
    assert counts[2:] == [counts[2]] * 3


def test_elixir_train_stops_by_name_or_skips_with_the_flag(tmp_path, capsys):
    from elixir.cli import main

    blow_up = ["train", "--model", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-batches",
               "1", "--hardware", "CPU", "--lr", "1e38", "--clip", "0", "--warmup-steps", "0", "--quiet"]
    assert main(blow_up) == 1  # step 1 makes the weights huge, step 2's gradients are not finite
    err = capsys.readouterr().err
    assert "elixir train: error: step 2: non-finite gradients (first in parameter" in err, err
    assert main([*blow_up, "--nonfinite", "skip", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["steps"] == 4 and result["nonfinite_steps"] == 3  # steps 2-4 skipped, the model as after 1
