"""Checkpoints over several ranks (gloo, spawned here): exact resume, resharding to 1 and 4 ranks,
and the export round trip into transformers."""

import copy

import pytest
import torch
from dist import run_ranks, train_ranks

import elixir
from helpers import assert_close_rel, batches, build, make_plan

STEPS = 4
EPS, LR = 1e-6, 1e-3  # as in test_distributed: the comparison across world sizes is about the runtime


def build_gpt():
    from elixir.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=64, bias=False))


def _setup(kind, dtype=torch.float32):
    model = build_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, fused=True)
    return elixir.wrap(model, opt, plan=make_plan(model, kind, opt, dtype=dtype))


def _steps(model, opt, data, rank, world):
    """The global batches' losses of training on this rank's rows, backward through the optimizer."""
    return train_ranks(model, opt, data, rank, world, opt_backward=True)[0]


def _resume_exact(rank, world, path):
    data = batches(2 * STEPS, batch=8)
    for dtype in (torch.float32, torch.bfloat16):
        whole = _steps(*_setup("mixed", dtype), data, rank, world)
        model, opt = _setup("mixed", dtype)
        a = _steps(model, opt, data[:STEPS], rank, world)
        elixir.save(model, opt, f"{path}/{dtype}")
        model, opt = _setup("host", dtype)  # another plan too
        elixir.load(model, opt, f"{path}/{dtype}")
        b = _steps(model, opt, data[STEPS:], rank, world)
        assert a + b == whole, (dtype, a + b, whole)


@pytest.mark.dist
def test_resume_on_two_ranks_is_bit_identical(tmp_path):
    run_ranks(_resume_exact, 2, str(tmp_path))


def _save_half_way(rank, world, path):
    model, opt = _setup("on_demand")
    _steps(model, opt, batches(2 * STEPS, batch=8)[:STEPS], rank, world)
    elixir.save(model, opt, path)


def _resume_and_compare(rank, world, path, want):
    model, opt = _setup("resident" if world == 1 else "mixed")
    elixir.load(model, opt, path)
    got = _steps(model, opt, batches(2 * STEPS, batch=8)[STEPS:], rank, world)
    assert_close_rel(got, want, 1e-5)


@pytest.mark.dist
def test_a_checkpoint_of_two_ranks_resumes_on_one_and_on_four(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_half_way, 2, path)
    model, opt = _setup("resident")
    want = _steps(model, opt, batches(2 * STEPS, batch=8), 0, 1)[STEPS:]  # uninterrupted, one process
    _resume_and_compare(0, 1, path, want)
    run_ranks(_resume_and_compare, 4, path, want)
    # the checkpoint is still the 2-rank one: resharding only reads
    import json

    with open(f"{path}/manifest.json") as f:
        assert json.load(f)["world_size"] == 2


def _export_round_trip(rank, world, family, path):
    model = build(family)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, fused=True)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, "host", opt))
    _steps(model, opt, batches(3, batch=8), rank, world)
    with torch.no_grad():
        logits = model.eval()(input_ids=batches(1, seed=7)[0]).logits
    elixir.export(model, path, max_shard_bytes=40_000)
    if rank == 0:
        torch.save(logits, f"{path}.logits.pt")


@pytest.mark.dist
def test_export_after_training_on_two_ranks_loads_in_transformers(tmp_path):
    import transformers

    for family in ("llama", "opt"):
        path = str(tmp_path / family)
        run_ranks(_export_round_trip, 2, family, path)
        # loaded here, outside the process group (from_pretrained looks at torch.distributed when it is
        # initialised), against the logits the trained, wrapped model gave on rank 0
        back = getattr(transformers, type(build(family)).__name__).from_pretrained(path).eval()
        with torch.no_grad():
            got = back(input_ids=batches(1, seed=7)[0]).logits
        torch.testing.assert_close(got, torch.load(f"{path}.logits.pt"), rtol=0, atol=1e-5)


def _load_pretrained_ranks(rank, world, path, want):
    ref = build("llama")
    with torch.device("meta"):
        model = type(ref)(copy.deepcopy(ref.config))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, "on_demand", opt))
    elixir.load_pretrained(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=batches(1)[0]).logits, want, rtol=0, atol=0)


@pytest.mark.dist
def test_load_pretrained_on_two_ranks(tmp_path):
    ref = build("llama").eval()
    ref.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = ref(input_ids=batches(1)[0]).logits
    run_ranks(_load_pretrained_ranks, 2, str(tmp_path / "hf"), want)
