"""What the integrations share: reading the plan option, moving schedulers onto the Elixir optimizer, the
compute dtype a framework's precision names, and framework state packed into an Elixir checkpoint."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable

import torch

from elixir.plan import Plan

PlanOption = str | os.PathLike | Plan | Callable[[torch.nn.Module, torch.optim.Optimizer], Plan]
"""How an integration is told the plan: "auto" (elixir.plan searches one from a batch), an `elixir.Plan`, the
path of a plan file (the JSON of `Plan.to_json`, which `elixir plan --json` writes), or a function of the module
and its optimizer returning a Plan. The function is called once the ranks exist, on every rank, so a plan made
there (`Plan.uniform(module, ...)`) is made for the world size the run has: a Plan built before the launcher
started the ranks is made for one rank."""


def check_plan_option(plan: PlanOption) -> None:
    """ValueError now, when the integration is built, for a plan option that can never work."""
    if isinstance(plan, Plan) or callable(plan) or plan == "auto":
        return
    if isinstance(plan, (str, os.PathLike)):
        if not os.path.isfile(plan):
            raise ValueError(f"plan={str(plan)!r} is not 'auto' and no such plan file exists; pass 'auto', an "
                             "elixir.Plan, a plan file (elixir plan --json) or a function (module, optimizer) -> Plan")
        return
    raise ValueError(f"plan must be 'auto', an elixir.Plan, a plan file or a function returning one, not "
                     f"{type(plan).__name__}")


def resolve_plan(plan: PlanOption, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Plan | str:
    """The Plan (or "auto") that `plan` names for this module, read or made now."""
    check_plan_option(plan)
    if isinstance(plan, Plan) or plan == "auto":
        return plan
    if isinstance(plan, (str, os.PathLike)):
        with open(plan) as f:
            return Plan.from_json(f.read())
    made = plan(module, optimizer)
    if not isinstance(made, Plan):
        raise ValueError(f"the plan function returned {type(made).__name__}; it must return an elixir.Plan")
    return made


# Lightning's precision names (and what Hugging Face's bf16/fp16 flags mean) as Elixir's compute dtype: the
# dtype of the parameters during forward and backward; the fp32 masters keep full precision either way.
_PRECISIONS = {
    "32-true": torch.float32, "32": torch.float32,
    "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
    "16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16,
}


def compute_dtype_of(precision: str) -> torch.dtype:
    dtype = _PRECISIONS.get(str(precision))
    if dtype is None:
        raise ValueError(
            f"precision={precision!r} is not supported by Elixir, which computes in float32, bfloat16 or float16 "
            "with fp32 masters; use '32-true', 'bf16-mixed' (or 'bf16-true'), or '16-mixed' (or '16-true')"
        )
    return dtype


def rebind_scheduler(scheduler, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Point an lr scheduler built on the user's optimizer at the Elixir optimizer that replaces it.

    The Elixir optimizer keeps the user's hyper-parameters in param groups of its own (their params are the
    chunks' masters), so a scheduler left on the user's optimizer would change learning rates nobody reads.
    Schedulers that hold others (SequentialLR, ChainedScheduler) are followed."""
    if scheduler is None:
        return
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        _count_steps_like_torch(new)
    for inner in getattr(scheduler, "_schedulers", None) or ():
        rebind_scheduler(inner, old, new)


def _count_steps_like_torch(optimizer: torch.optim.Optimizer) -> None:
    # A scheduler marks its optimizer's step when it is built, to warn when it is stepped before the optimizer;
    # a scheduler moved onto another optimizer would warn that `step` was replaced. Mark the new one alike.
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = type(optimizer).step

    @functools.wraps(step)
    def counted(*args, **kwargs):
        optimizer._opt_called = True
        return step(optimizer, *args, **kwargs)

    counted._wrapped_by_lr_sched = True
    optimizer.step = counted


def pack_state(state: dict) -> torch.Tensor:
    """A framework's own checkpoint dict (loops, callbacks, schedulers...) as bytes in a tensor, so that it goes
    into the Elixir checkpoint's `extra` and is written atomically with the model and optimizer. It is read back
    by the framework's own loader, with the framework's own `weights_only` choice (`unpack_state`)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def unpack_state(packed: torch.Tensor, load: Callable) -> dict:
    """`load` is the framework's loader of a file object (Lightning's `pl_load` with its weights_only)."""
    return load(io.BytesIO(packed.numpy().tobytes()))
