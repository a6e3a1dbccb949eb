"""The peers from other libraries: FSDP2 (`fully_shard`) and DeepSpeed ZeRO-3, built as `elixir bench` runs them.

Each is imported only inside the function that builds it (DeepSpeed is an optional dependency, and
importing it has effects on the process), from a deep copy of the base model, with the same
`torch.optim.AdamW(fused=True)` and hyper-parameters as the other systems (elixir/bench/systems.py) and
no gradient clipping (DeepSpeed's default 1.0 is switched off).

DeepSpeed ZeRO-3 replaces `torch.nn.functional.linear` process-wide and never restores it; the step of a
DeepSpeed system switches it on around its own step only, so the other systems in the same process run
torch's own linear.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable

import torch

from elixir.bench.models import blocks_of
from elixir.bench.systems import BETAS, EPS, LR, TORCH_LINEAR, WEIGHT_DECAY, System, adamw, plain_step

DEEPSPEED_MISSING = "DeepSpeed not installed: pip install 'elixir-train[bench]'"


def _quiet_renamed_collectives() -> None:
    """FSDP2 and DeepSpeed call the collectives torch 2.13 renamed, and one warning per call drowns the output:
    the process that builds one of them (a benchmark) ignores those warnings from then on. Importing this
    module changes no filter. A `warnings.catch_warnings()` around the build would not cover the steps, where
    the collectives run, and one around every step would sit inside the timed region and reset the warning
    registries at each step."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated\. Please use")


def build_fsdp2(base: torch.nn.Module, device, dtype: torch.dtype, *, offload: bool) -> System:
    """fully_shard per block, then the root; CPUOffloadPolicy (pinned on CUDA only) with `offload`."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    _quiet_renamed_collectives()
    device = torch.device(device)
    m = copy.deepcopy(base).train()
    kw = {}
    notes = ["reshard_after_forward=True"]
    if offload:
        pin = device.type == "cuda"
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=pin)
        notes.append(f"CPUOffloadPolicy(pin_memory={pin})")
        m = m.to("cpu")
    else:
        m = m.to(device)
    if dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        notes.append(f"MixedPrecisionPolicy(param_dtype={dtype}, reduce_dtype=float32)")
    for block in blocks_of(m):
        fully_shard(block, **kw)
    fully_shard(m, **kw)
    opt = adamw(m.parameters())
    name = "fsdp2-offload" if offload else "fsdp2"
    return System(name, m, opt, plain_step(m, opt), ", ".join(notes))


def deepspeed_available() -> bool:
    """Whether `import deepspeed` works (it reads DS_ACCELERATOR once, on first import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or broken for this torch: either way it cannot run
        return False
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return True


def build_deepspeed(base: torch.nn.Module, device, dtype: torch.dtype, *, offload: bool, local_batch: int,
                    log: Callable[[str], None] = print) -> System:
    """ZeRO stage 3, gradient_clipping 0.0 (its default is 1.0; nobody else clips); the client
    torch.optim.AdamW(fused=True) when it accepts it, else its own "AdamW" type (DeepSpeedCPUAdam with
    the optimizer offloaded). Its F.linear override is applied during its own steps only."""
    import deepspeed

    _quiet_renamed_collectives()
    device = torch.device(device)
    m = copy.deepcopy(base).to(device).train()
    config = {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    ds_adamw = {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                            "weight_decay": WEIGHT_DECAY}}
    engine = note = None
    if not offload:
        try:  # client optimizer: the same torch.optim.AdamW as the other systems
            engine, opt, _, _ = deepspeed.initialize(model=m, optimizer=adamw(m.parameters()), config=config)
            note = f"client torch.optim.AdamW(fused=True) -> {type(opt.optimizer).__name__}"
        except Exception as e:  # noqa: BLE001 - report and fall back
            torch.nn.functional.linear = TORCH_LINEAR
            log(f"[deepspeed] client torch.optim.AdamW rejected ({type(e).__name__}: {e}); using its 'AdamW' type")
            m = copy.deepcopy(base).to(device).train()
    if engine is None:
        config["optimizer"] = ds_adamw
        engine, opt, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=config)
        inner = getattr(opt, "optimizer", opt)
        note = f"its 'AdamW' type -> {type(inner).__name__}"
    ds_linear = torch.nn.functional.linear
    torch.nn.functional.linear = TORCH_LINEAR
    if ds_linear is not TORCH_LINEAR:
        note += "; its F.linear override applied in its steps only"

    def step(x):
        torch.nn.functional.linear = ds_linear
        try:
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        finally:
            torch.nn.functional.linear = TORCH_LINEAR
        return loss

    name = "deepspeed-offload" if offload else "deepspeed"
    return System(name, engine, opt, step, note)
