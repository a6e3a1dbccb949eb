"""Timing one block of the model being planned (elixir/search/block.py): what is recorded, when it is skipped,
and the scale it gives, against a clock the test moves itself (no timed assertions)."""

import dataclasses
import itertools
import math
import time
import warnings

import pytest
import torch

import elixir
from elixir.hardware import Hardware
from elixir.profile import profile
from elixir.search import block as block_timing
from elixir.search import simulate
from elixir.search.block import BlockInputs, compute_scale
from helpers import batches, build

TICK = 0.01  # seconds the test's clock moves at every reading


def _instant_cpu(op_overhead_s: float = 1e-3) -> Hardware:
    """A CPU whose kernels take no time at all: a step's prediction is its operators x `op_overhead_s`. Marked
    as measured in this process, as `Hardware.measure()` marks its records."""
    return Hardware(
        name="test-cpu", device_type="cpu", device_bytes=10**10, host_bytes=10**10, matmul_flops={"float32": 1e30},
        h2d_bytes_per_s=1e30, d2h_bytes_per_s=1e30, device_copy_bytes_per_s=1e30, device_optim_elems_per_s=1e30,
        host_optim_elems_per_s=1e30, op_overhead_s=op_overhead_s, measured_here=True,
    )


@pytest.fixture
def clock(monkeypatch):
    """time.perf_counter moves TICK seconds at every reading: every timed run of the block takes TICK."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) * TICK)


def _recorded(model, x):
    with BlockInputs(model) as block:
        profile(model, {"input_ids": x, "labels": x})
    return block


def _block_ops(block: BlockInputs) -> int:
    """Operators of the block's forward, its output's sum and their backward, as the timing profiles them."""
    return len(profile(block_timing._Step(block.block), {"args": list(block.args), "kwargs": block.kwargs},
                       loss_fn=lambda loss: loss).ops)


def _rest_ops(model, x) -> int:
    """Operators of the model's step with every block passing its input through: the rest of the step."""
    blocks = list(model.h) if hasattr(model, "h") else list(model.model.layers)
    for b in blocks:
        b.forward = lambda hidden, *args, **kwargs: hidden
    try:
        return len(profile(model, {"input_ids": x, "labels": x}).ops)
    finally:
        for b in blocks:
            del b.forward


def _scale(blocks: int, block_ops: int, rest_ops: int) -> float:
    """The scale when every timed run takes TICK and every operator is predicted at 1 ms: `blocks` runs of the
    block and one of the rest of the step, over their predictions."""
    return (blocks + 1) * TICK / ((blocks * block_ops + rest_ops) * 1e-3)


def test_the_first_block_s_inputs_are_recorded_on_the_meta_device():
    model, x = build("gpt"), batches(1)[0]
    block = _recorded(model, x)
    assert block.block is model.h[0] and block.kwargs == {}
    (hidden,) = block.args
    assert hidden.is_meta and hidden.shape == (*x.shape, model.config.n_embd) and hidden.requires_grad
    # the model's own call, and what the block gave back
    assert block.model_args == () and set(block.model_kwargs) == {"input_ids", "labels"}
    assert block.output.is_meta and block.output.shape == hidden.shape
    assert not model.h[0]._forward_pre_hooks and not model.h[0]._forward_hooks  # the hooks went with the context
    assert not model._forward_pre_hooks
    assert BlockInputs(torch.nn.Sequential(torch.nn.Linear(4, 4))).block is None  # no repeated blocks


def test_the_scale_is_the_block_s_measured_time_over_its_predicted_one(clock):
    model, x = build("gpt"), batches(1)[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    block = _recorded(model, x)
    ops = _block_ops(block)
    # each run reads the clock twice: TICK seconds; the prediction is `ops` operators of 1 ms, no kernel time.
    # The block stands for each of the model's blocks, and the rest of the step (embeddings, head, loss) is
    # timed with every block passing its input through
    scale = compute_scale(block, _instant_cpu(), device="cpu")
    assert scale == pytest.approx(_scale(len(model.h), ops, _rest_ops(model, x)))
    # random weights of the model's shapes did the work: the model is untouched, has no gradients, and its blocks
    # have their own forward again
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert not any("forward" in b.__dict__ for b in model.h)
    # where the rest cannot be rebuilt (a batch that is neither a dict of tensors nor one tensor), the block's
    # time alone
    block.model_args = (x, x)
    assert compute_scale(block, _instant_cpu(), device="cpu") == pytest.approx(TICK / (ops * 1e-3))


def test_a_hugging_face_block_runs_without_the_cache_it_was_given(clock):
    pytest.importorskip("transformers")
    model, x = build("llama"), batches(1)[0]
    block = _recorded(model, x)
    assert any(type(v).__name__.endswith("Cache") for v in block.kwargs.values())  # HF's key-value cache
    assert isinstance(block.kwargs["position_embeddings"], tuple)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it ran: no warning that it could not
        scale = compute_scale(block, _instant_cpu(), device="cpu")
    blocks = len(model.model.layers)
    assert scale == pytest.approx(_scale(blocks, _block_ops_without_cache(block), _rest_ops(model, x)))


def _block_ops_without_cache(block: BlockInputs) -> int:
    kwargs = {k: None if type(v).__name__.endswith("Cache") else v for k, v in block.kwargs.items()}
    return len(profile(block_timing._Step(block.block), {"args": list(block.args), "kwargs": kwargs},
                       loss_fn=lambda loss: loss).ops)


def test_no_block_is_timed_where_it_cannot_tell_anything(monkeypatch):
    model, x = build("gpt"), batches(1)[0]
    block = _recorded(model, x)

    def never(*args, **kwargs):
        raise AssertionError("the block was run")

    monkeypatch.setattr(block_timing, "_compute_scale", never)
    # a preset, or a record read from a file: not this process's device
    assert compute_scale(block, Hardware.preset("CPU"), device="cpu") == 1.0
    assert compute_scale(block, dataclasses.replace(_instant_cpu(), device_type="cuda"), device="cpu") == 1.0
    # expert-parallel layers: their all-to-alls need every rank
    assert compute_scale(block, _instant_cpu(), device="cpu", expert_parallel=True) == 1.0
    # a model without repeated blocks
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with BlockInputs(mlp) as none:
        profile(mlp, torch.zeros(2, 4))
    assert compute_scale(none, _instant_cpu(), device="cpu") == 1.0


class _MetaOnly(torch.nn.Module):
    """A block that traces on the meta device and fails when run for real, with `error`."""

    def __init__(self, width: int, error: type[Exception]):
        super().__init__()
        self.lin, self.error = torch.nn.Linear(width, width), error

    def forward(self, h):
        if not h.is_meta:
            raise self.error("this block runs only inside its model")
        return self.lin(h)


def test_a_block_too_slow_to_time_or_failing_keeps_the_rates():
    model, x = build("gpt"), batches(1)[0]
    block = _recorded(model, x)
    # predicted over 0.25 s (1 s per operator): not run (running it would raise an AssertionError)
    block.block = _MetaOnly(model.config.n_embd, AssertionError)
    assert compute_scale(block, _instant_cpu(op_overhead_s=1.0), device="cpu") == 1.0
    # it fails when run: a warning names the error, and the rates alone predict
    block.block = _MetaOnly(model.config.n_embd, RuntimeError)
    with pytest.warns(UserWarning, match="could not time one block of the model.*RuntimeError: this block runs only"):
        assert compute_scale(block, _instant_cpu(), device="cpu") == 1.0


def test_plan_predicts_with_the_scale_of_the_model_s_block(clock):
    model, x = build("gpt"), batches(1)[0]
    batch = {"input_ids": x, "labels": x}
    ops = _block_ops(_recorded(model, x))
    plan = elixir.plan(model, batch, hardware=_instant_cpu(), world_size=1)
    scale = _scale(len(model.h), ops, _rest_ops(model, x))
    assert plan.predicted["compute_scale"] == pytest.approx(scale)
    assert plan.predicted["step_s"] == pytest.approx(
        simulate(profile(model, batch), plan, _instant_cpu().with_compute_scale(scale)).step_s)
    # with a preset (another machine, a what-if) nothing is timed and the rates alone predict
    preset = elixir.plan(model, batch, hardware=Hardware.preset("CPU"), world_size=1)
    assert preset.predicted["compute_scale"] == 1.0
    assert math.isfinite(preset.predicted["step_s"])
