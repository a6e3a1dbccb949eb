"""What the stages of bench/gpu/run.sh share: flags, the device, the models (shrunk for --dry-run), JSON, the
machine's measured rates, the offload setup (model, sequences, cap) and its plans, the systems' training steps
on a global batch, and the measurement of one system.

Every stage is a script run from the repository root (PYTHONPATH=. so that `elixir` imports without being
installed), writes its results to $OUT/<stage>.json as soon as it has them, and stops starting new
repetitions once its time box (--budget-s) is nearly spent, so that run.sh's hard timeout only ever cuts
a stage that hangs. With --dry-run a stage runs the same code on the CPU with tiny models.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

import elixir
from elixir import bench as B
from elixir.hardware import Hardware

GiB = 2**30
STARTED = time.perf_counter()


def parser(description: str, budget_s: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: the same code paths, in seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or "./gpu-out", help="folder for JSON results")
    p.add_argument("--budget-s", type=float, default=budget_s,
                   help=f"time box of the stage: no repetition starts after 80%% of it (default: {budget_s:g})")
    return p


def device_for(args) -> torch.device:
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run bench/gpu/run.sh --dry-run to try the stages on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def deadline(args) -> float:
    return STARTED + 0.8 * args.budget_s


def log(*a) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s]", *a, flush=True)


def shrunk_family_config(name: str, width: int = 64, layers: int = 2):
    """A family preset's transformers config with its sizes shrunk to a toy (same architecture and code)."""
    from elixir.models.families import family_config

    cfg = family_config(name)
    for attr, value in (("hidden_size", width), ("num_hidden_layers", layers), ("num_attention_heads", 4),
                        ("ffn_dim", 4 * width), ("word_embed_proj_dim", width), ("intermediate_size", 2 * width),
                        ("num_key_value_heads", 4), ("vocab_size", 512), ("max_position_embeddings", 128)):
        if hasattr(cfg, attr):
            setattr(cfg, attr, value)
    return cfg


def family_model(name: str, device, *, dry_run: bool, seed: int = 0, width: int = 64,
                 layers: int = 2) -> torch.nn.Module:
    """A family preset at its published size, or shrunk (to `width` and `layers`) for the dry run; dropout
    off, training mode."""
    if dry_run:
        return B.build_model(name, device=device, seed=seed, config=shrunk_family_config(name, width, layers))
    return B.build_model(name, device=device, seed=seed)


def vocab_of(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(cfg.vocab_size)


def freeze_gc() -> None:
    """Keep what the imports made (torch's and transformers' millions of objects) out of every later garbage
    collection: elixir.bench collects before each build and repetition, which takes 0.3 s a time on a small
    CPU otherwise. A meta-device OPT is built first, so that transformers' lazily imported modules are in."""
    import gc

    offload_model(OFFLOAD_MODEL, "meta", dry_run=True)
    gc.collect()
    gc.freeze()


def machine(device: torch.device) -> dict:
    out = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
           "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def write_json(args, stage: str, data: dict) -> str:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{stage}.json")
    data = {"stage": stage, "dry_run": args.dry_run, "date_utc": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "elapsed_s": time.perf_counter() - STARTED, **data}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def error_text(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]


# --- the machine ---------------------------------------------------------------------------------------------------


def hardware(args) -> Hardware:
    """The machine's rates, measured once per run: by the first stage that asks (Hardware.measure(), cached as
    usual), kept in $OUT/hardware.json and read from there by every later stage, so that every plan of the run
    is searched for the same figures, and none is measured while a background stage loads the CPUs."""
    path = os.path.join(args.out, "hardware.json")
    try:
        with open(path) as f:
            return Hardware.from_json(f.read())
    except (OSError, ValueError, TypeError, KeyError):
        pass
    hw = Hardware.measure()
    os.makedirs(args.out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(hw.to_json())
    os.replace(path + ".tmp", path)
    return hw


# --- the offload setup: a model at twice the device memory it is given --------------------------------------------

OFFLOAD_MODEL = "opt-2.7b"
SEQ_LEN = 1024
"""Tokens per sequence. 1024 rather than 2048: attention, which 6 x params x tokens leaves out, adds 6% to
OPT-2.7B's FLOPs at 1024 and 13% at 2048, and a global batch holds twice as many sequences, so the planner has
twice the micro-batch sizes to choose from (8k tokens is 8 sequences, not 4)."""
DRY_SEQ_LEN = 16
DRY_SEQUENCES = 8
"""--dry-run: an eighth of the sequences (at least one), of DRY_SEQ_LEN tokens: 8 sequences at 64k, 1 at 8k."""
OFFLOAD_TOKENS = 65536
CURVE_TOKENS = (8192, 131072, 16384, 32768)
"""The curve's global batches besides OFFLOAD_TOKENS (which the offload stage measures), extremes first: a time
box that cuts the curve short leaves out a point in the middle."""
MODEL_DATA_BYTES_PER_PARAM = 16
"""fp32 master weight, gradient and two AdamW states: the cap is half of this per parameter."""
SPARE_CAP = 0.8
"""The offload stage's plan is also searched for this share of the cap, for a retry should it run out of
device memory at the cap itself."""
MAX_NORM = 1.0
"""Every system clips the gradient's global norm to this, as training does."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """The offload and curve stages' model, sequences and device cap (the planner's and, on a GPU, the
    allocator's): the same in every stage and in the planner's searches."""

    model: str
    dry_run: bool
    n_params: int
    vocab_size: int

    @classmethod
    def of(cls, model: str, dry_run: bool) -> Setup:
        meta = offload_model(model, "meta", dry_run=dry_run)
        return cls(model, dry_run, B.num_params(meta), vocab_of(meta))

    @property
    def seq_len(self) -> int:
        return DRY_SEQ_LEN if self.dry_run else SEQ_LEN

    @property
    def cap_bytes(self) -> int:
        return self.n_params * MODEL_DATA_BYTES_PER_PARAM // 2

    @property
    def model_data_bytes(self) -> int:
        return self.n_params * MODEL_DATA_BYTES_PER_PARAM

    def sequences_of(self, gpu_tokens: int) -> int:
        """Sequences of a global batch (or micro-batch) given in the GPU run's tokens."""
        n = gpu_tokens // SEQ_LEN
        return max(1, n // DRY_SEQUENCES) if self.dry_run else n

    def tokens(self, gpu_tokens: int) -> int:
        """Tokens per step of a global batch given in the GPU run's tokens."""
        return self.sequences_of(gpu_tokens) * self.seq_len

    def sequences(self, tokens: int) -> int:
        return tokens // self.seq_len

    def describe(self) -> dict:
        return {"model": self.model, "dry_run": self.dry_run, "n_params": self.n_params, "seq_len": self.seq_len,
                "dtype": "bf16", "cap_bytes": self.cap_bytes, "model_data_bytes": self.model_data_bytes}


def offload_model(name: str, device, *, dry_run: bool) -> torch.nn.Module:
    """The offload stages' model: the preset, or with --dry-run the shrunk one (bf16 matmuls are slow on a CPU)."""
    return family_model(name, device, dry_run=dry_run)


def cap_device(device: torch.device, cap_bytes: int) -> None:
    """Let this process's CUDA allocator hold at most `cap_bytes` (a no-op on the CPU)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)


# --- plans ---------------------------------------------------------------------------------------------------------


def search_plan(model: str, dry_run: bool, hardware_json: str, tokens: int, *, activations: bool = False) -> dict:
    """The planner's search for `tokens` per step on `hardware_json` (its device memory: the cap), on a
    meta-device copy of the model: plans.py runs it in worker processes, a stage without a plan from there
    in its own. With `activations`, also the profiled activation bytes of the chosen micro-batch under each
    checkpointing option (FSDP2 chooses its checkpointing from them)."""
    from elixir.models.checkpointing import checkpointing

    hw = Hardware.from_json(hardware_json)
    meta = offload_model(model, "meta", dry_run=dry_run)
    seq_len = DRY_SEQ_LEN if dry_run else SEQ_LEN
    x = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    batch = {"input_ids": x, "labels": x}
    out: dict = {"tokens_per_step": tokens, "cap_bytes": hw.device_bytes}
    started = time.perf_counter()
    try:
        plan = elixir.plan(meta, batch, hardware=hw, compute_dtype=torch.bfloat16, tokens_per_step=tokens)
    except elixir.PlanDoesNotFitError as e:
        return out | {"error": error_text(e), "plan_s": time.perf_counter() - started}
    out |= {"plan": plan.to_json(), "summary": plan.summary(), "predicted": plan.predicted,
            "micro_batch_size": plan.micro_batch_size, "grad_accum": plan.grad_accum,
            "checkpoint_every": plan.checkpoint_every, "plan_s": time.perf_counter() - started}
    if activations:
        out["activation_bytes"] = {}
        for every in (0, 2, 1):
            with checkpointing(meta, every):
                prof = elixir.profile(meta, batch, compute_dtype=torch.bfloat16)
            out["activation_bytes"][str(every)] = prof.scaled(plan.micro_batch_size).peak_activation_bytes
    return out


def find_plan(args, setup: Setup, hw: Hardware, tokens: int, cap_bytes: int, *, activations: bool = False) -> dict:
    """The plan for `tokens` per step under `cap_bytes`: from plans.json when the plans stage searched it for
    this setup, else searched here (and said so in the log)."""
    try:
        with open(os.path.join(args.out, "plans.json")) as f:
            found = json.load(f)
    except (OSError, ValueError):
        found = {}
    if found.get("setup") == setup.describe():
        for point in found.get("points", []):
            if point["tokens_per_step"] == tokens and point["cap_bytes"] == cap_bytes and (
                    not activations or "activation_bytes" in point or "error" in point):
                return point | {"searched_in": "plans stage"}
    log(f"no plan for {tokens} tokens per step and a cap of {cap_bytes / GiB:.2f} GiB in plans.json: "
        "searching it here")
    point = search_plan(setup.model, setup.dry_run, hw.with_memory(device_bytes=cap_bytes).to_json(), tokens,
                        activations=activations)
    return point | {"searched_in": "this stage"}


# --- the systems: one optimizer step on a global batch --------------------------------------------------------------


CAPPED = "device capped"


def accumulating_step(model: torch.nn.Module, micro_batch: int, backward: Callable, clip: Callable,
                      update: Callable) -> Callable:
    """A training step on a global batch `x` of sequences: `micro_batch` of them at a time, each loss divided
    by the number of micro-batches (the gradient of the mean loss), then the clip and the update. Returns the
    mean loss; `step.grad_norms` collects the norms before clipping (tensors, read after the timing)."""
    norms: list = []

    def step(x: torch.Tensor) -> torch.Tensor:
        parts = x.split(micro_batch)
        total = torch.zeros((), device=x.device)
        for part in parts:
            loss = model(input_ids=part, labels=part).loss / len(parts)
            backward(loss)
            total += loss.detach()
        norms.append(clip())
        update()
        return total

    step.grad_norms = norms
    return step


def build_pytorch(base: torch.nn.Module, device, micro_batch: int) -> B.System:
    """Plain PyTorch on the whole device, as elixir.bench.build_pytorch's bf16 system: a bf16 copy
    computes, fp32 masters hold the weights AdamW updates; each micro-batch's gradients are added into the
    masters' fp32 gradients (accumulating in bf16 would round them), which torch's clip_grad_norm_ clips."""
    master = copy.deepcopy(base).to(device).train()
    opt = B.adamw(master.parameters())
    compute = copy.deepcopy(master).to(torch.bfloat16).train()
    masters, computes = list(master.parameters()), list(compute.parameters())
    for p in masters:
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in masters]

    def backward(loss):
        loss.backward()
        pairs = [(m.grad, c.grad) for m, c in zip(masters, computes) if c.grad is not None]
        torch._foreach_add_([m for m, _ in pairs], [c for _, c in pairs])
        compute.zero_grad(set_to_none=True)

    def update():
        opt.step()
        torch._foreach_zero_(grads)
        with torch.no_grad():
            torch._foreach_copy_(computes, masters)

    step = accumulating_step(compute, micro_batch, backward,
                             lambda: torch.nn.utils.clip_grad_norm_(masters, MAX_NORM, foreach=True), update)
    return B.System("pytorch", compute, opt, step, f"bf16 compute copy, fp32 master weights and AdamW; "
                    f"micro-batch {micro_batch}", setting="whole device",
                    description="plain PyTorch on the whole device")


def clip_local_(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ on the gradients' local tensors. On one rank an FSDP2 shard is the whole gradient; the
    DTensor form would reduce the norm of CPU (offloaded) gradients over the CUDA process group."""
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def build_fsdp2_offload(base: torch.nn.Module, device, micro_batch: int, checkpoint_every: int) -> B.System:
    """elixir.bench.build_fsdp2 with offload (CPUOffloadPolicy, pinned on CUDA; bf16 compute, fp32
    reduction; AdamW on the host) and activation checkpointing of every `checkpoint_every`-th block (0: none)
    applied before sharding. Gradients accumulate in FSDP2's fp32 host shards, reduced every micro-batch."""
    from elixir.models import apply_checkpointing

    apply_checkpointing(base, checkpoint_every)
    s = B.build_fsdp2(base, device, torch.bfloat16, offload=True)
    params = list(s.model.parameters())

    def update():
        s.optim.step()
        s.optim.zero_grad()

    s.step_fn = accumulating_step(s.model, micro_batch, lambda loss: loss.backward(),
                                  lambda: clip_local_(params, MAX_NORM), update)
    s.note += f"; micro-batch {micro_batch}, checkpointing " + (f"every {checkpoint_every} block(s)"
                                                                 if checkpoint_every else "none")
    s.setting = CAPPED
    return s


def build_elixir(base: torch.nn.Module, device, plan) -> B.System:
    """Elixir under `plan` (which says the micro-batch; elixir.wrap applies its checkpointing), its
    optimizer's clip_grad_norm_."""
    s = B.build_elixir(base, device, plan.dtype, None, None, plan=plan)

    def update():
        s.optim.step()
        s.optim.zero_grad()

    s.step_fn = accumulating_step(s.model, plan.micro_batch_size, s.optim.backward,
                                  lambda: s.optim.clip_grad_norm_(MAX_NORM), update)
    s.setting = CAPPED
    return s


# --- measuring one system -----------------------------------------------------------------------------------------


def allocation_counters(device: torch.device, model: torch.nn.Module | None = None) -> dict:
    """Cumulative counts of what allocates memory from the system: CUDA's allocator (cudaMalloc and cudaFree
    calls, allocation retries, segments), its pinned host allocator (blocks created), and Elixir's tracker
    (buffers, of which pinned). Constant over steps in steady state."""
    out: dict = {}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        for key in ("num_device_alloc", "num_device_free", "num_alloc_retries", "segment.all.allocated"):
            out[f"cuda.{key}"] = stats.get(key)
        host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        for key in ("num_host_alloc", "num_host_free"):
            out[f"cuda_host.{key}"] = host.get(key)
    if model is not None:
        tracker = elixir.runtime_of(model).tracker
        out["elixir.allocations"] = tracker.allocations
        out["elixir.pinned_allocations"] = tracker.pinned_allocations
    return out


def measure(system: str, build: Callable[[], B.System], x: torch.Tensor, *, args, n_params: int, reps: int,
            warmup: int, checkpoint_every: int = 0, stop_at: float | None = None) -> tuple[dict | None, str | None]:
    """Build one system and warm it up, then `reps` timed steps on the global batch `x` (one per repetition,
    medians), by elixir.bench's meters. Returns (its row, None) or (None, why it did not run). The row adds
    to elixir.bench's: the counters of allocation_counters per timed step, grad norms, host bytes per
    parameter, peak reserved device memory, hardware TFLOPS (8 x params x tokens when every block recomputes
    its forward) and, for Elixir, elixir.step_stats over the timed steps."""
    device = x.device
    tokens = x.numel()
    meters = B.meters_for(device)
    systems, skipped = B.build_all({system: build}, x, warmup=warmup, device=device, meters=meters, log=log)
    if not systems:
        return None, skipped[system]
    s = systems[0]
    wrapped = s.model if s.family == "elixir" else None
    stats_before = elixir.step_stats(wrapped) if wrapped is not None else None
    before = allocation_counters(device, wrapped)
    done = B.compare(systems, x, reps=reps, steps=1, tokens_per_step=tokens, device=device, meters=meters,
                     deadline=deadline(args) if stop_at is None else stop_at, log=log)
    after = allocation_counters(device, wrapped)
    host = meters.get("host") or meters["ram"]
    summary = B.summarize(systems, steps=1, tokens_per_step=tokens, n_params=n_params, world=1, meters=meters)
    row = summary["rows"][0]
    host_peak = row["memory"]["host" if "host" in row["memory"] else "ram"]["peak_bytes"]
    row |= {
        "reps": done, "warmup": warmup, "tokens_per_step": tokens,
        "per_step_counters": {k: None if v is None else (after[k] - v) / done for k, v in before.items()},
        "grad_norms": [float(n) for n in s.step_fn.grad_norms],
        "losses": summary["losses"][system],
        "host_bytes_per_param": host_peak / n_params,
        "process_rss_peak_bytes": host.peak(),
        "hardware_tflops": (6 + (2 / checkpoint_every if checkpoint_every else 0)) * n_params * tokens
        / row["step_s"] / 1e12,
    }
    if device.type == "cuda":
        row["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    if wrapped is not None:
        stats = elixir.step_stats(wrapped)
        row["step_stats"] = stats
        row["timed_step_stats"] = {k: stats[k] - stats_before[k] for k in ("steps", "speculated_steps",
                                                                          "rollbacks", "late_gradients")}
        row["timed_rollback_reasons"] = {k: v - stats_before["rollback_reasons"].get(k, 0)
                                         for k, v in stats["rollback_reasons"].items()}
        row["elixir_host_bytes_per_param"] = row["elixir_counters"]["host_bytes_peak"] / n_params
    return row, None


def free_device(device: torch.device) -> None:
    """Hand what the last system left back: Python's cycles, then the CUDA allocator's cached blocks."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: str | None) -> bool:
    return bool(error) and "OutOfMemoryError" in error
