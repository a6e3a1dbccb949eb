"""Side-by-side training benchmarks: Elixir against plain PyTorch, FSDP2 and DeepSpeed ZeRO-3.

The pieces that `elixir bench`, bench/bench_dist.py and the GPU benchmark under bench/gpu/ share, written
once so that every system trains the same model on the same batch with the same optimizer, and is timed
and measured the same way (docs/architecture.md, "How we measure"):

- `build_model` and `make_batch`: a GPT preset (elixir.models) or a public family preset (OPT, GPT-2,
  Llama dimensions; elixir.models.families), dropout off, from one seed; random token ids.
- `build_pytorch`, `build_fsdp2`, `build_deepspeed`, `build_elixir`: a `System` (model, optimizer and one
  training step) from a deep copy of one base model, all with `torch.optim.AdamW(fused=True)` and the
  same hyper-parameters; no gradient clipping anywhere (DeepSpeed's default 1.0 is switched off).
- `compare`: warm-up steps, then repetitions in which every system runs its steps in turn (the order
  rotating), with a barrier and the slowest rank's time; per system the memory it keeps after being
  built plus the most it adds during a repetition, by a `MemoryMeter`.
- `summarize` and `format_table`: medians, TFLOPS (6 x params x tokens / time, per rank), and ratios to
  Elixir computed within each repetition, then the median.

Mixed precision (bf16) is the same math in every system: bf16 weights for compute, fp32 master
weights, gradients and AdamW states. Plain PyTorch does it by hand (a bf16 copy of the model whose
gradients are copied into the fp32 master's, and the updated master copied back), FSDP2 with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, DeepSpeed with `"bf16": {"enabled": true}`,
Elixir with `compute_dtype=bf16`. `build_pytorch(..., amp=True)` is the autocast alternative (fp32
weights, bf16 matmuls), which computes slightly different numbers.

DeepSpeed ZeRO-3 replaces `torch.nn.functional.linear` process-wide and never restores it; the step of a
DeepSpeed system switches it on around its own step only, so the other systems in the same process run
torch's own linear.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import elixir
from elixir import comm
from elixir.models import GPT, GPTConfig

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01
TORCH_LINEAR = torch.nn.functional.linear
DEEPSPEED_MISSING = "DeepSpeed not installed: pip install 'elixir-train[bench]'"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

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

# Models for benchmarks, beyond the GPT presets and the families: name -> (GPT preset, overrides)
BENCH_MODELS = {
    # the 10.84M-parameter GPT of BENCHMARKS.md's many-ranks run: 6 blocks of width 384, byte vocabulary
    "gpt-10m": ("small", {"n_layer": 6, "n_embd": 384, "n_head": 6}),
}



def _quiet_renamed_collectives() -> None:
    """FSDP2 and DeepSpeed call the collectives torch 2.13 renamed, and one warning per call drowns the output:
    the process that builds one of them (a benchmark) ignores those warnings from then on. Importing this
    module changes no filter."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated\. Please use")


# --- models and batches --------------------------------------------------------------------------


def model_names() -> tuple[str, ...]:
    from elixir.models.families import family_names

    return (*BENCH_MODELS, *GPTConfig.preset_names(), *family_names())


def gpt_config(name: str, **overrides) -> GPTConfig | None:
    """The GPTConfig of a GPT preset or bench model (with fields overridden); None for a family name."""
    if name in BENCH_MODELS:
        preset, fixed = BENCH_MODELS[name]
        return GPTConfig.preset(preset, **{**fixed, **overrides})
    if name in GPTConfig.preset_names():
        return GPTConfig.preset(name, **overrides)
    return None


def model_limits(name: str, **overrides) -> tuple[int, int]:
    """(longest sequence, vocabulary size) of a model name, without building it; ValueError naming the
    known models for an unknown one."""
    cfg = gpt_config(name, **overrides)
    if cfg is not None:
        return cfg.block_size, cfg.vocab_size
    if overrides:
        raise ValueError(f"{', '.join(overrides)} override the GPT presets only, not {name!r}")
    from elixir.models.families import family_config

    try:
        hf = family_config(name)
    except ValueError:
        raise ValueError(f"unknown model {name!r}; the models are: {', '.join(model_names())}") from None
    longest = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None) or 2048
    return int(longest), int(hf.vocab_size)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Switch off every dropout (nn.Dropout modules and the float `*dropout`/`layerdrop` attributes of
    Hugging Face modules): random masks would make the systems' losses differ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in attr or attr == "layerdrop"):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for attr, value in config.to_dict().items():
            if isinstance(value, float) and ("dropout" in attr or attr == "layerdrop"):
                setattr(config, attr, 0.0)
    return model


def build_model(name: str, *, device: torch.device | str = "cpu", seed: int = 0, config=None,
                **overrides) -> torch.nn.Module:
    """A model by name (see model_names) built on `device` from `seed`, in training mode, no dropout.
    `config`: a transformers config to build instead of a name (the GPU benchmark's shrunk families)."""
    torch.manual_seed(seed)
    if config is not None:
        import transformers

        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        cfg = gpt_config(name, **overrides)
        if cfg is not None:
            with torch.device(device):
                model = GPT(cfg)
        else:
            from elixir.models.families import build_family

            model = build_family(name, device=device)
    return no_dropout(model).train()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def make_batch(batch_size: int, seq_len: int, vocab_size: int, *, seed: int = 1) -> torch.Tensor:
    """Random token ids (the same on every rank for the same seed), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: the ModuleList holding the most parameters (GPT.h, OPT's decoder.layers,
    Llama's layers, GPT-2's transformer.h)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks for fully_shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


# --- systems -------------------------------------------------------------------------------------


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


# --- process group, memory, timing ---------------------------------------------------------------


def single_process_group(device: torch.device, timeout_s: float = 600.0) -> Callable[[], None]:
    """Join a process group of one rank (FSDP2 and DeepSpeed need one even alone), with the environment
    DeepSpeed reads; returns the function that leaves it and restores the environment."""
    import socket

    if dist.is_initialized():
        return lambda: None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=timeout_s))

    def leave() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return leave


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def max_over_ranks(values: Sequence[float]) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_ok(ok: bool) -> bool:
    """True when `ok` on every rank: all ranks must agree whether a system runs, or collectives hang."""
    return max_over_ranks([0.0 if ok else 1.0])[0] == 0.0


class MemoryMeter:
    """Bytes in use now, and at peak since `reset_peak`, by one counter:
    "cuda": torch.cuda.memory_allocated / max_memory_allocated of the current device;
    "rss": the process's resident set (Linux /proc/self/status VmRSS; the peak VmHWM, reset by writing 5
    to /proc/self/clear_refs). RSS counts what malloc holds, not what is live; `now` and `reset_peak` first
    hand malloc's free pages back (glibc malloc_trim), so that a delta counts memory put to use, not pages
    that an earlier system freed and this one reuses."""

    def __init__(self, kind: str) -> None:
        if kind not in ("cuda", "rss"):
            raise ValueError(f"MemoryMeter kind {kind!r}: use 'cuda' or 'rss'")
        self.kind = kind
        self._resettable = kind == "cuda"
        self._floor = 0
        if kind == "rss":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._resettable = True
            except OSError:
                pass

    @property
    def source(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.kind == "cuda" else "RSS"

    def now(self) -> int:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        _malloc_trim()
        return _proc_status("VmRSS")

    def reset_peak(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        _malloc_trim()
        if self._resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._floor = self.now()

    def peak(self) -> int:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._resettable:
            return _proc_status("VmHWM")
        return max(self._floor, self.now())  # no resettable peak: what is in use after the steps


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC = None


def _proc_status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def meters_for(device: torch.device) -> dict[str, MemoryMeter]:
    """{"device": ..., "host": ...} on a GPU; {"ram": RSS} on a CPU-only machine (device and host are the
    same memory there)."""
    if device.type == "cuda":
        return {"device": MemoryMeter("cuda"), "host": MemoryMeter("rss")}
    return {"ram": MemoryMeter("rss")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Progress:
    """One progress line on rank 0: redrawn in place on a terminal, a line per update otherwise."""

    def __init__(self, out=None, enabled: bool = True) -> None:
        self.out = out or sys.stdout
        self.enabled = enabled and comm.rank_and_world()[0] == 0
        self.tty = self.enabled and self.out.isatty()
        self.started = time.perf_counter()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        m, s = divmod(int(time.perf_counter() - self.started), 60)
        text = f"[{m}:{s:02d}] {text}"
        if self.tty:
            self.out.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
            self._width = 0


def build_all(builders: dict[str, Callable[[], System]], x: torch.Tensor, *, warmup: int, device: torch.device,
              meters: dict[str, MemoryMeter], log: Callable[[str], None] = print,
              progress: Progress | None = None) -> tuple[list[System], dict[str, str]]:
    """Build each system in turn and run its warm-up steps, recording the memory it keeps. A system that
    fails to build or warm up (on any rank) is left out with its reason; the run goes on."""
    systems: list[System] = []
    skipped: dict[str, str] = {}
    for name, build in builders.items():
        if progress:
            progress.update(f"building {name} + {warmup} warm-up step(s)")
        gc.collect()
        sync(device)
        before = {k: m.now() for k, m in meters.items()}
        started = time.perf_counter()
        err = None
        try:
            s = build()
            for _ in range(warmup):
                s.step(x)
            sync(device)
        except Exception as e:  # noqa: BLE001 - a system that cannot run here is reported, not fatal
            torch.nn.functional.linear = TORCH_LINEAR
            text = str(e).strip()
            err = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
            s = None
        if not all_ok(err is None):
            skipped[name] = err or "failed on another rank"
            log(f"[{name}] CANNOT RUN: {skipped[name]}")
            del s
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        gc.collect()
        s.retained = {k: max(0, m.now() - before[k]) for k, m in meters.items()}
        systems.append(s)
        log(f"[{name}] built + {warmup} warm-up step(s) in {time.perf_counter() - started:.1f} s; {s.note}")
    return systems, skipped


def compare(systems: list[System], x: torch.Tensor, *, reps: int, steps: int, tokens_per_step: int,
            device: torch.device, meters: dict[str, MemoryMeter], progress: Progress | None = None,
            deadline: float | None = None, log: Callable[[str], None] = print) -> int:
    """Alternate the systems: every repetition times `steps` steps of each in turn (the order rotates),
    between barriers, keeping the slowest rank's time, and the most memory the steps added per meter.
    Stops starting repetitions after `deadline` (time.perf_counter()); returns the repetitions run."""
    order = list(systems)
    done = 0
    for rep in range(reps):
        if deadline is not None and rep > 0 and not all_ok(time.perf_counter() <= deadline):
            log(f"time box reached: {rep} of {reps} repetitions run")
            break
        for s in order:
            if progress:
                progress.update(f"rep {rep + 1}/{reps}: {s.name} ({steps} step(s))")
            gc.collect()
            sync(device)
            base = {k: m.now() for k, m in meters.items()}
            for m in meters.values():
                m.reset_peak()
            barrier()
            start = time.perf_counter()
            for _ in range(steps):
                s.step(x)
            sync(device)
            elapsed = time.perf_counter() - start
            barrier()
            added = [max(0, m.peak() - base[k]) for k, m in meters.items()]
            elapsed, *added = max_over_ranks([elapsed, *added])
            for k, v in zip(meters, added):
                s.transient[k] = max(s.transient.get(k, 0), int(v))
            s.seconds.append(elapsed)
            s.tokens_per_s.append(steps * tokens_per_step / elapsed)
        done += 1
        order = order[1:] + order[:1]
    if progress:
        progress.done()
    return done


# --- results -------------------------------------------------------------------------------------


def reference_of(s: System, systems: list[System]) -> System | None:
    """The Elixir system a system is compared with: Elixir of the same setting, else any Elixir."""
    elixirs = [o for o in systems if o.family == "elixir"]
    same = [o for o in elixirs if o.setting == s.setting]
    return (same or elixirs or [None])[0]


def losses_over_ranks(systems: list[System]) -> dict[str, list[float]]:
    out = {}
    for s in systems:
        t = torch.stack([v.float().reshape(()) for v in s.losses]).double().cpu()
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            t = t.cpu() / dist.get_world_size()
        out[s.name] = t.tolist()
    return out


def summarize(systems: list[System], *, steps: int, tokens_per_step: int, n_params: int, world: int,
              meters: dict[str, MemoryMeter], check_steps: int = 5) -> dict:
    """Rows (one per system, medians over repetitions) and the ratios to Elixir, computed per repetition."""
    losses = losses_over_ranks(systems)
    ref_name = next((s.name for s in systems if s.family == "pytorch"),
                    next((s.name for s in systems if s.family == "elixir"), systems[0].name))
    ref = losses[ref_name]

    def rel_diff(v: list[float], k: int) -> float:
        pairs = list(zip(v[:k], ref[:k]))
        return max((abs(a - b) / max(abs(b), 1e-12) for a, b in pairs), default=0.0)

    ratios = {}
    rows = []
    for s in systems:
        sec = statistics.median(s.seconds) / steps
        tps = statistics.median(s.tokens_per_s)
        row = {
            "system": s.name, "setting": s.setting, "description": s.description, "note": s.note,
            "tokens_per_s": tps, "tokens_per_s_per_rep": s.tokens_per_s, "seconds_per_rep": s.seconds,
            "step_s": sec, "tflops_per_rank": 6 * n_params * tokens_per_step / world / sec / 1e12,
            "memory": {k: {"peak_bytes": s.retained.get(k, 0) + s.transient.get(k, 0),
                           "retained_bytes": s.retained.get(k, 0), "step_added_bytes": s.transient.get(k, 0),
                           "source": m.source}
                       for k, m in meters.items()},
            "loss_rel_diff_first_steps": rel_diff(losses[s.name], check_steps),
            "loss_rel_diff_all_steps": rel_diff(losses[s.name], len(ref)),
        }
        other = reference_of(s, systems)
        if other is not None:
            per_rep = [a / b for a, b in zip(s.tokens_per_s, other.tokens_per_s)]
            q = {"vs": other.name, "per_rep": per_rep, "median": statistics.median(per_rep),
                 "min": min(per_rep), "max": max(per_rep)}
            row["speed_vs_elixir"] = q
            if s is not other:
                ratios[f"{s.name}/{other.name}"] = q
            mem = {}
            for k in meters:
                mine, theirs = row["memory"][k]["peak_bytes"], other.retained.get(k, 0) + other.transient.get(k, 0)
                mem[k] = mine / theirs if theirs else None
            row["memory_vs_elixir"] = mem
        if s.family == "elixir":
            st = elixir.memory_stats(s.model)
            row["elixir_counters"] = {k: st[k] for k in ("device_bytes_peak", "host_bytes_peak", "num_chunks",
                                                         "cache_blocks", "gathers")}
            row["predicted"] = s.predicted
            row["predicted_step_s"] = s.predicted.get("step_s")
        rows.append(row)
    return {"rows": rows, "ratios": ratios, "losses": losses, "loss_reference": ref_name}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(summary: dict, skipped: dict[str, str] | None = None, reps: int | None = None) -> str:
    """The results as a Markdown table, with a legend naming where each figure comes from."""
    rows = summary["rows"]
    if not rows:
        return "no system ran"
    meter_keys = list(rows[0]["memory"])
    labels = {"device": "peak device MiB", "host": "peak host MiB", "ram": "peak RAM MiB"}
    head = ["setting", "system", "tokens/s", "TFLOPS/rank", "ms/step", "predicted ms/step",
            "tokens/s ÷ Elixir's" + (f" (median, min-max over {reps} rep(s))" if reps else "")]
    head += [labels[k] for k in meter_keys] + [f"{labels[k].split(' MiB')[0]} ÷ Elixir's" for k in meter_keys]
    head += ["Elixir counters: device/host MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        q = r.get("speed_vs_elixir")
        speed = "-" if q is None else f"{q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})"
        pred = r.get("predicted_step_s")
        cells = [r["setting"], r["system"], f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_rank']:.3g}",
                 f"{r['step_s'] * 1e3:,.0f}", "-" if pred is None else f"{pred * 1e3:,.0f}", speed]
        cells += [_mib(r["memory"][k]["peak_bytes"]) for k in meter_keys]
        cells += [_x((r.get("memory_vs_elixir") or {}).get(k)) for k in meter_keys]
        c = r.get("elixir_counters")
        cells.append("-" if c is None else f"{_mib(c['device_bytes_peak'])}/{_mib(c['host_bytes_peak'])}")
        lines.append("| " + " | ".join(cells) + " |")
    for name, why in (skipped or {}).items():
        setting = SYSTEMS[name][0] if name in SYSTEMS else ""
        lines.append(f"| {setting} | {name} | not run: {why} |" + " |" * (len(head) - 3))
    sources = {k: rows[0]["memory"][k]["source"] for k in meter_keys}
    legend = [
        "TFLOPS/rank = 6 x parameters x tokens / step time / ranks; ratios are computed per repetition, "
        "then the median.",
        "Peak memory per rank = what the system kept after being built and warmed up + the most its steps "
        "added, by " + ", ".join(f"{labels[k].split(' MiB')[0].removeprefix('peak ')}: {src} delta"
                                 for k, src in sources.items())
        + ("; device and host are the same RAM on this machine" if "ram" in sources else "")
        + ("; RSS deltas are approximate (free pages are handed back to the system before each reading, "
           "pages still held are counted)" if any(src == "RSS" for src in sources.values()) else "") + ".",
        "Elixir counters: model data (parameters, gradients, optimizer states; no activations) at peak, as "
        "elixir.memory_stats counts it; predicted ms/step: the plan's plan.predicted['step_s'].",
    ]
    return "\n".join(lines + [""] + legend)

