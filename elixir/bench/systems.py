"""The systems a benchmark compares, and what every one of them shares.

`build_pytorch` and `build_elixir` build a `System` (model, optimizer and one training step) from a deep
copy of one base model, all with `torch.optim.AdamW(fused=True)` and the same hyper-parameters
(`adamw`); no gradient clipping anywhere. The peers from other libraries, FSDP2 and DeepSpeed ZeRO-3,
are built in elixir/bench/peers.py. `SYSTEMS` names every system with its setting (offload or not) and
family.

Mixed precision (bf16) is the same math in every system: bf16 weights for compute, fp32 master
weights, gradients and AdamW states. Plain PyTorch does it by hand (a bf16 copy of the model whose
gradients are copied into the fp32 master's, and the updated master copied back), FSDP2 with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, DeepSpeed with `"bf16": {"enabled": true}`,
Elixir with `compute_dtype=bf16`. `build_pytorch(..., amp=True)` is the autocast alternative (fp32
weights, bf16 matmuls), which computes slightly different numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import elixir
from elixir.plan import DTYPE_FLAGS

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01
TORCH_LINEAR = torch.nn.functional.linear
DTYPES = {flag: DTYPE_FLAGS[flag] for flag in ("fp32", "bf16")}  # the dtypes every compared system runs

NO_OFFLOAD, OFFLOAD = "no offload", "offload"
SYSTEMS = {
    # name: (setting, family, description)
    "pytorch": (NO_OFFLOAD, "pytorch", "plain PyTorch"),
    "pytorch-amp": (NO_OFFLOAD, "pytorch", "plain PyTorch, fp32 weights under torch.autocast"),
    "fsdp2": (NO_OFFLOAD, "fsdp2", "FSDP2 fully_shard per block + root"),
    "deepspeed": (NO_OFFLOAD, "deepspeed", "DeepSpeed ZeRO-3"),
    "elixir": (NO_OFFLOAD, "elixir", "Elixir, searched plan"),
    "fsdp2-offload": (OFFLOAD, "fsdp2", "FSDP2 + CPUOffloadPolicy"),
    "deepspeed-offload": (OFFLOAD, "deepspeed", "DeepSpeed ZeRO-3 + offload_optimizer cpu"),
    "elixir-offload": (OFFLOAD, "elixir", "Elixir, searched plan with every optimizer on host"),
}
# `elixir bench` runs these by default (pytorch-amp is the GPU benchmark's extra baseline)
DEFAULT_SYSTEMS = ("pytorch", "fsdp2", "deepspeed", "elixir", "fsdp2-offload", "deepspeed-offload", "elixir-offload")


def adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)


@dataclass
class System:
    """One trainable system: its step, and what was measured of it."""

    name: str
    model: torch.nn.Module
    optim: object
    step_fn: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""
    plan: object = None
    predicted: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    tokens_per_s: list = field(default_factory=list)
    retained: dict = field(default_factory=dict)
    """Bytes per memory meter that building and warming the system left in use."""
    transient: dict = field(default_factory=dict)
    """Most bytes per memory meter that one repetition added above what was in use before it."""
    setting: str = ""
    family: str = ""
    description: str = ""
    """Default to SYSTEMS[name]'s; given for systems that are not in SYSTEMS."""

    def __post_init__(self) -> None:
        known = SYSTEMS.get(self.name, ("", "", ""))
        self.setting = self.setting or known[0]
        self.family = self.family or known[1]
        self.description = self.description or known[2]

    def step(self, x: torch.Tensor) -> None:
        self.losses.append(self.step_fn(x).detach())


def plain_step(model, optim, autocast_dtype: torch.dtype | None = None):
    device_type = next(model.parameters()).device.type

    def step(x):
        if autocast_dtype is None:
            loss = model(input_ids=x, labels=x).loss
        else:
            with torch.autocast(device_type, dtype=autocast_dtype):
                loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        return loss

    return step


def build_pytorch(base: torch.nn.Module, device, dtype: torch.dtype, *, amp: bool = False) -> System:
    """Plain PyTorch on one device. fp32: the model and AdamW. bf16: a bf16 copy computes, an fp32 master
    copy holds the weights the optimizer updates (the same math as the other systems); with `amp`,
    fp32 weights under torch.autocast instead."""
    name = "pytorch-amp" if amp else "pytorch"
    master = copy.deepcopy(base).to(device).train()
    opt = adamw(master.parameters())
    if dtype == torch.float32 or amp:
        note = f"torch.autocast({dtype})" if amp else "fp32"
        return System(name, master, opt, plain_step(master, opt, dtype if amp else None), note)
    compute = copy.deepcopy(master).to(dtype).train()
    masters, computes = list(master.parameters()), list(compute.parameters())
    for p in masters:
        p.grad = torch.zeros_like(p)

    def step(x):
        loss = compute(input_ids=x, labels=x).loss
        loss.backward()
        pairs = [(m.grad, c.grad) for m, c in zip(masters, computes) if c.grad is not None]
        torch._foreach_copy_([m for m, _ in pairs], [c for _, c in pairs])
        for p in computes:
            p.grad = None
        opt.step()
        with torch.no_grad():
            torch._foreach_copy_(computes, masters)
        return loss

    return System(name, compute, opt, step, f"{dtype} compute copy, fp32 master weights and AdamW")


def optimizer_on_host(plan):
    """The plan with every chunk's fp32 master, gradient shard and AdamW states on the host."""
    chunks = tuple(dataclasses.replace(c, optim_home="host") for c in plan.chunks)
    return dataclasses.replace(plan, chunks=chunks, predicted={})


def build_elixir(base: torch.nn.Module, device, dtype: torch.dtype, local_x: torch.Tensor, hardware, *,
                 optim_on_host: bool = False, plan=None) -> System:
    """Elixir with the plan elixir.plan searches for `hardware` (one rank's batch `local_x`), or `plan`;
    with `optim_on_host`, that plan with every optimizer moved to the host (its prediction re-simulated)."""
    m = copy.deepcopy(base).train()
    opt = adamw(m.parameters())
    batch = {"input_ids": local_x, "labels": local_x}
    if plan is None:
        plan = elixir.plan(m, batch, hardware=hardware, compute_dtype=dtype)
    if optim_on_host:
        from elixir.search import simulate

        plan = optimizer_on_host(plan)
        prediction = simulate(elixir.profile(m, batch, compute_dtype=dtype), plan, hardware)
        plan = dataclasses.replace(plan, predicted=prediction.as_dict())
    m, opt = elixir.wrap(m, opt, plan=plan, device=device)
    stats = elixir.memory_stats(m)
    homes = sorted({(c.resident, c.param_home, c.optim_home) for c in plan.chunks})
    where = "; ".join(f"{'resident' if r else 'on demand'}/params {p}/optim {o}" for r, p, o in homes)
    note = (f"{stats['num_chunks']} chunks of {plan.chunk_numel * plan.dtype.itemsize / 2**20:.2f} MiB, "
            f"{stats['cache_blocks']} cache blocks; {where}")
    return System("elixir-offload" if optim_on_host else "elixir", m, opt, plain_step(m, opt), note, plan=plan,
                  predicted=dict(plan.predicted))


def warm_process(device: torch.device, base: torch.nn.Module | None = None, x: torch.Tensor | None = None) -> None:
    """One untimed forward and backward of `base` (when given), and one fused AdamW step on a scrap tensor:
    the process's one-time allocations (thread pools, kernel caches, the modules the optimizer imports)
    then count against no system's memory."""
    if base is not None:
        base(input_ids=x, labels=x).loss.backward()
        base.zero_grad(set_to_none=True)
    scrap = torch.zeros(16, device=device, requires_grad=True)
    scrap.grad = torch.ones_like(scrap)
    adamw([scrap]).step()
    del scrap
    gc.collect()
