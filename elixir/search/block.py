"""Time one block of the model being planned on the device, and the rest of its step: how much longer its
operators take than the calibrated rates predict (`Hardware.compute_scale`).

[Note: one block of the model, timed]
The calibration times operators of its own (square products, a few memory-bound operators, a tiny transformer
for the cost of running an operator at all) and the cost model charges every profiled operator at those rates.
A model's own operators can run slower in its step than the calibration's: BENCHMARKS.md found GPT-NeoX's
blocks (a partial rotary embedding: slices, concatenations and products of a few KiB each) at 1.17-1.24x their
prediction on the 2-core CPU, while OPT's and Llama's blocks were within 4% of theirs, in the same process
right after a calibration. Nothing in the calibration knows a model's family, but the model is at hand when
the plan is made: its first block is run here, forward and backward, on inputs shaped as the profile saw them,
in turns with the rest of the step (the model with every block passing its input through: embeddings, head,
loss and the model's own Python around its blocks). With B blocks, (B x the block's median time + the rest's)
over the cost model's prediction for the same operators becomes `Hardware.compute_scale`, by which the cost
model multiplies every operator's time (the cost of interception and the runtime's own work excluded: the
calibration measures those on its own).

- The inputs: the first block's arguments, its output and the model's own arguments (the batch) are recorded,
  as meta tensors, by hooks while the profile traces the step (`BlockInputs`). For the timing, floating
  tensors become random ones of their shape and dtype (keeping `requires_grad`), integer ones zeros (valid
  positions, indices and labels), booleans True; other objects the block was given (a key-value cache) become
  None.
- The weights: random ones of the block's shapes and dtypes on the device, through `functional_call`, so a
  model on the meta device or on the host is neither copied whole nor modified; for the rest of the step,
  random ones of every parameter outside the blocks, and the blocks' `forward` is replaced for the time of the
  runs (put back after, also on an error).
- Why the rest: on the 2-core CPU the Hugging Face Llama of BENCHMARKS.md ran the rest of its step at 1.8x the
  rates' prediction (20.6 ms against 11.5: HF's Python around the blocks, the log-softmax over the vocabulary)
  while its block ran at 1.1-1.2x; GPT-NeoX, OPT and Qwen2 at 1.05-1.3x. A scale from the block alone left
  Llama's step 8% short in one process; with the rest, the resident plans of the six bench models came within
  0.93-1.00 of their steps there.
- Skipped (scale 1.0) where a block cannot be run alone: no repeated blocks found, expert-parallel layers
  (their all-to-alls need every rank), a hardware record that does not describe this device
  (`Hardware.measured_here` is False: a preset, or a file from elsewhere), a block predicted to take over
  0.25 s (a large model on a CPU: seven rounds of it would hold up the plan), or any error while running it (a
  warning says which). The rest alone is left out (the block's own ratio stands) where it cannot run: a batch that was
  not a dict of tensors or one tensor, a block output of another structure, a rest predicted over 0.25 s, or
  an error while running it.
- What it does not see: B copies of the first block stand for all B (a model whose blocks differ, dense and
  MoE layers in turn, gets the first one's ratio for all), and a block alone, repeated, finds warmer caches
  than in the step.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from elixir.hardware import Hardware

# time spent timing the block and the rest of the step, in turns: rounds repeat until this much has passed (at
# least 3 rounds, at most 100)
_MIN_TOTAL_S = 2.0
_MAX_REPS = 100
_WARMUP = 3  # the first runs allocate what later ones reuse
_MAX_RUN_S = 0.25  # a block predicted slower than this is not timed: 3 + 4 rounds would hold up the plan


class BlockInputs:
    """Records the arguments of `model`'s first transformer block, and of the model itself, as the profile traces
    it: use as a context around `elixir.profile(model, ..., loss_fn)`. `args`/`kwargs` stay None when the model
    has no blocks."""

    def __init__(self, model: nn.Module, loss_fn=None) -> None:
        from elixir.models.checkpointing import transformer_blocks

        self.model, self.loss_fn = model, loss_fn
        self.blocks = transformer_blocks(model)
        self.block = self.blocks[0] if self.blocks else None
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self.model_args: tuple | None = None  # the model's own call (the batch), for the rest of the step
        self.model_kwargs: dict | None = None
        self.output: Any = None  # the first block's output, on the meta device
        self._handles: list = []

    def __enter__(self) -> BlockInputs:
        if self.block is not None:
            self._handles = [self.block.register_forward_pre_hook(self._record, with_kwargs=True),
                             self.block.register_forward_hook(self._record_output),
                             self.model.register_forward_pre_hook(self._record_model, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _record(self, module, args, kwargs):
        if self.args is None:  # the first call: a checkpointed block's recomputation calls it again
            self.args, self.kwargs = args, dict(kwargs)

    def _record_output(self, module, args, output):
        if self.output is None:
            self.output = output

    def _record_model(self, module, args, kwargs):
        if self.model_args is None:
            self.model_args, self.model_kwargs = args, dict(kwargs)


def _real(value: Any, device: torch.device, generator: torch.Generator) -> Any:
    """A value of the block's recorded arguments made real on `device` (see the Note)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            t = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(device, value.dtype)
            return t.requires_grad_(value.requires_grad)
        if value.dtype == torch.bool:
            return torch.ones(value.shape, dtype=torch.bool, device=device)
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    return None  # an object of the model's own (a cache): the block runs without it


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"the block returned {type(output).__name__}, not a tensor or a tuple starting with one")


class _Step(nn.Module):
    """The block's forward and the sum of its output, the loss: what is timed, and profiled."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, args: list, kwargs: dict) -> torch.Tensor:
        return _first_tensor(self.block(*args, **kwargs)).sum()


def compute_scale(recorded: BlockInputs, hardware: Hardware, *, compute_dtype=torch.float32,
                  device: torch.device | str | None = None, expert_parallel: bool = False) -> float:
    """`Hardware.compute_scale` for the model whose first block `recorded` saw (see [Note: one block of the
    model, timed]): the block's measured forward and backward over the cost model's prediction, or 1.0 where
    it cannot be timed here."""
    block = recorded.block
    if block is None or recorded.args is None or expert_parallel or not hardware.measured_here:
        return 1.0
    from elixir import accel

    device = torch.device(device) if device is not None else accel.default_device()
    if device.type != hardware.device_type:
        return 1.0
    try:
        return _compute_scale(recorded, hardware, compute_dtype, device)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        warnings.warn(f"elixir.plan: could not time one block of the model ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); the step time is predicted "
                      "from the calibration's rates alone", stacklevel=3)
        return 1.0
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _compute_scale(recorded: BlockInputs, hardware: Hardware, compute_dtype, device: torch.device) -> float:
    from elixir.plan import DTYPES, dtype_name
    from elixir.profile import profile
    from elixir.search.cost import OperatorTimes

    dtype = DTYPES[dtype_name(compute_dtype)]
    block = recorded.block
    g = torch.Generator().manual_seed(0)
    args = [_real(a, device, g) for a in recorded.args]
    kwargs = tree_map(lambda v: _real(v, device, g), recorded.kwargs)
    step = _Step(block)
    predicted = sum(map(OperatorTimes(hardware, dtype), profile(step, {"args": args, "kwargs": kwargs},
                                                              loss_fn=lambda loss: loss, compute_dtype=dtype).ops))
    if not 0 < predicted <= _MAX_RUN_S:  # a block too slow to time here (a large model on a CPU)
        return 1.0
    state = _random_state(block, dtype, device, g)
    params = [w for w in state.values() if w.requires_grad]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        loss = torch.func.functional_call(step, {f"block.{k}": v for k, v in state.items()}, (args, kwargs))
        loss.backward()
        for t in params + inputs:
            t.grad = None
        sync()

    rest = _rest_of_step(recorded, hardware, dtype, device, g, sync)
    if rest is None:
        (measured,) = _median_times([run], _MIN_TOTAL_S)
        return measured / predicted
    measured, rest_measured = _median_times([run, rest[0]], _MIN_TOTAL_S)
    blocks = len(recorded.blocks)
    return (blocks * measured + rest_measured) / (blocks * predicted + rest[1])


def _random_state(module: nn.Module, dtype, device: torch.device, g: torch.Generator,
                  leave_out: set[int] = frozenset()) -> dict[str, torch.Tensor]:
    """Random weights of `module`'s parameter shapes (floating ones in `dtype`, keeping `requires_grad`) and its
    buffers (zeros where they are on the meta device) on `device`, by name, for `functional_call`; tensors whose
    id is in `leave_out` keep the module's own."""
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if id(p) not in leave_out:
            kind = dtype if p.is_floating_point() else p.dtype
            state[name] = (torch.randn(p.shape, generator=g) * 0.02).to(device, kind).requires_grad_(p.requires_grad)
    for name, b in module.named_buffers():
        if id(b) not in leave_out:
            state[name] = torch.zeros(b.shape, dtype=b.dtype, device=device) if b.is_meta else b.to(device)
    return state


def _median_times(runs: list, min_total_s: float) -> list[float]:
    """Median seconds of each of `runs`, which take turns: `_WARMUP` rounds of one run each, then rounds until
    there are at least 3 and together they take `min_total_s` (at most `_MAX_REPS` rounds). Runs that take turns
    see the same moments of a machine whose speed wanders: on the 2-core VM of BENCHMARKS.md a model's block ran
    at 1.3-1.5x its usual time for one to three seconds now and then, which a block timed alone for 0.3 s, then
    the rest of the step for 0.15 s, could each catch whole. Over 2 s in turns a spell takes a smaller share of
    the runs: ten predictions of Qwen2's resident step, each from a timing between its steps in one process,
    spread 0.127 (standard deviation of the logarithm of predicted over the median step) with 0.6 s of rounds
    and 0.059 with 2 s; Llama's 0.056 and 0.033."""
    for _ in range(_WARMUP):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    total = 0.0
    while len(times[0]) < 3 or (total < min_total_s and len(times[0]) < _MAX_REPS):
        for run, seconds in zip(runs, times):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
            total += seconds[-1]
    return [statistics.median(seconds) for seconds in times]


def _passing_through(output: Any):
    """A block's forward that returns its input hidden states in the structure of `output`, its own output as
    the profile saw it: a tensor, or a tuple whose first element is one (the rest None)."""
    if isinstance(output, torch.Tensor):
        return lambda hidden, *args, **kwargs: hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        rest = (None,) * (len(output) - 1)
        return lambda hidden, *args, **kwargs: (hidden, *rest)
    return None


def _rest_of_step(recorded: BlockInputs, hardware: Hardware, dtype, device: torch.device, g: torch.Generator,
                  sync) -> tuple[Any, float] | None:
    """(a run of the model's step with every block passing its input through: the operators outside the blocks
    and the model's own Python, see the Note; its predicted seconds), the run tried once; None where that step
    cannot run here."""
    from elixir.profile import profile
    from elixir.profile.trace import _default_loss
    from elixir.search.cost import OperatorTimes

    model, args, kwargs = recorded.model, recorded.model_args, recorded.model_kwargs
    forward = _passing_through(recorded.output)
    if forward is None or args is None or (args and kwargs) or len(args) > 1:
        return None  # the profile's batch is a dict of tensors or one tensor; nothing else to rebuild it from
    real = tree_map(lambda v: _real(v, device, g), (list(args), kwargs))
    batch = real[0][0] if args else real[1]
    loss_fn = recorded.loss_fn or _default_loss
    try:
        with _blocks_passing_through(recorded.blocks, forward):
            predicted = sum(map(OperatorTimes(hardware, dtype),
                                profile(model, batch, recorded.loss_fn, compute_dtype=dtype).ops))
        if not 0 < predicted <= _MAX_RUN_S:
            return None
        in_blocks = {id(t) for b in recorded.blocks for t in [*b.parameters(), *b.buffers()]}
        state = _random_state(model, dtype, device, g, leave_out=in_blocks)
        params = [w for w in state.values() if w.requires_grad]

        def run() -> None:
            with _blocks_passing_through(recorded.blocks, forward):
                output = torch.func.functional_call(model, state, (batch,) if args else (), batch if kwargs else None)
                loss_fn(output).backward()
            for t in params:
                t.grad = None
            sync()

        run()  # where it fails, here: the blocks' own time stands alone
        return run, predicted
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None


@contextlib.contextmanager
def _blocks_passing_through(blocks: list[nn.Module], forward):
    """Every block's `forward` replaced by `forward` inside the context, its own (a checkpointed block's instance
    attribute, or none) put back after, also on an error."""
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for b in blocks:
            b.forward = forward
        yield
    finally:
        for b, own in zip(blocks, saved):
            if own is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = own
