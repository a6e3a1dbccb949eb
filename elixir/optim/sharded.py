"""The sharded optimizer: the user's optimizer class, run over chunk shards where they live.

Each trainable chunk has an fp32 master shard (and gradient shard) at its `optim_home`. The update
runs there with the user's optimizer class and hyper-parameters, one inner optimizer (a *stepper*) per
chunk, with the fused kernels where torch has them (fused AdamW on the CPU is ~10x faster than its
default). Per chunk, so that a chunk can be updated as soon as its gradient is final, during backward
(overlap.py); the update is elementwise, so stepping chunk by chunk gives the same bits as one call over
all of them. The wrapper keeps the user's param groups, so `torch.optim.lr_scheduler` works on it
unchanged.

[Note: every rank decides alike]
The fp16 overflow flag and the gradient norm are all-reduced over every rank of the run (the world of
`wrap`, which every chunk group is part of; each shard is held by one rank of it) before anyone
decides to skip a step or how much to clip; a rank-local decision would make ranks drift apart.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from contextlib import nullcontext

import torch

from elixir import comm
from elixir.optim.ondisk import DiskChunks
from elixir.optim.overlap import UPDATE_PARTS, Speculation, chunk_norm

# Optimizers whose update is elementwise: they give the same result on flat shards as on tensors.
# [Note: elementwise optimizers] says which others are accepted too.
ELEMENTWISE = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adamax,
    torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adadelta,
)
# Why well-known optimizers that are not elementwise cannot run on chunk shards, and what to use instead.
_NOT_ELEMENTWISE = {
    "Adafactor": "it factors the second moment over each matrix's rows and columns, which a flat shard does not "
                 "have; use torch.optim.AdamW (host offload, optim_home='host', saves the memory Adafactor saves)",
    "Muon": "it orthogonalizes each matrix's whole update, which needs the matrix; use torch.optim.AdamW",
    "LBFGS": "it keeps a history of whole flattened gradients and line-searches along it; use torch.optim.AdamW "
             "or torch.optim.SGD",
    "SparseAdam": "it updates sparse gradients, and chunk gradients are dense; use torch.optim.Adam",
    "Lamb": "it scales each tensor's update by that tensor's norms; use torch.optim.AdamW",
    "LARS": "it scales each tensor's update by that tensor's norms; use torch.optim.SGD",
    "Shampoo": "it preconditions each matrix by statistics of its rows and columns; use torch.optim.AdamW",
}
_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
)


# [Note: elementwise optimizers]
# A chunk shard is a flat slice that cuts tensors anywhere, and each chunk is updated on its own (overlap.py),
# so Elixir runs only updates in which every element's new value depends on that element's parameter,
# gradient and states, and on scalars (the step count, the hyper-parameters). An optimizer class is accepted:
# - when it is one of ELEMENTWISE;
# - when it subclasses one of them and its update is that class's: it defines neither `step` nor
#   `_init_group` (the states it makes) of its own. An `__init__` with other defaults, extra methods or hooks
#   are fine. The methods are compared under torch's decorators (`inspect.unwrap`): torch re-wraps an
#   inherited `step` on the subclass the first time one is built, which is not a definition of its own;
# - when the class says so with a class attribute `elixir_elementwise = True`: a subclass whose own `step`
#   stays elementwise, or any other torch.optim.Optimizer whose update is (Lion, sign SGD, ...). Its author
#   vouches for it, since what a `step` computes cannot be read off the code. `elixir_elementwise = False`
#   refuses even a class that would be accepted.
# Only Adam, AdamW and SGD themselves are undone after a wrong guess of the update inside backward
# (undo.py); every other accepted class, subclasses included, updates after backward.


def elementwise_base(optimizer_class: type) -> type | None:
    """The class of ELEMENTWISE whose update `optimizer_class` runs unchanged, or None (see [Note: elementwise
    optimizers]); `optimizer_class` itself when it is one."""
    base = next((c for c in optimizer_class.__mro__ if c in ELEMENTWISE), None)
    if base is None or base is optimizer_class:
        return base
    for name in ("step", "_init_group"):
        own = getattr(optimizer_class, name, None)
        theirs = getattr(base, name, None)
        if own is not None and theirs is not None and inspect.unwrap(own) is not inspect.unwrap(theirs):
            return None
    return base


def _check_elementwise(cls: type) -> None:
    """ValueError, with the alternative, for an optimizer class Elixir cannot run on chunk shards."""
    declared = getattr(cls, "elixir_elementwise", None)
    if declared is True:
        return
    name = cls.__name__
    if declared is None and elementwise_base(cls) is not None:
        return
    names = ", ".join(c.__name__ for c in ELEMENTWISE)
    base = next((c for c in cls.__mro__ if c in ELEMENTWISE), None)
    if declared is False:
        why = (
            f"{name} sets elixir_elementwise = False: its update is not elementwise, and Elixir updates flat shards "
            f"of chunks; use one of {names} (torch.optim.AdamW(fused=True) is the fast path)"
        )
    elif base is not None:
        why = (
            f"{name} subclasses torch.optim.{base.__name__} but defines its own step() or _init_group(), so its "
            "update may not stay elementwise (each element's new value from that element's parameter, gradient "
            "and states alone); if it does, set `elixir_elementwise = True` on the class, otherwise use "
            f"torch.optim.{base.__name__} itself"
        )
    else:
        known = next((v for k, v in _NOT_ELEMENTWISE.items() if name == k or name.startswith(k)), None)
        if known is None and name.lower().endswith("8bit"):
            known = ("it quantizes its states in blocks of each tensor's own layout; use torch.optim.AdamW, with "
                     "optim_home='host' (or 'disk') where its states do not fit on the device")
        why = (
            f"{name} is not supported: {known}" if known is not None else
            f"{name} is not supported: Elixir updates flat shards of chunks, which matches per-tensor updates only "
            f"for elementwise optimizers ({names}) and their subclasses; use one of them "
            "(torch.optim.AdamW(fused=True) is the fast path), or, if every element's update in "
            f"{name} depends only on that element and on scalars, set `elixir_elementwise = True` on the class"
        )
    raise ValueError(why)


def check_optimizer(optimizer, model: torch.nn.Module) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
    _check_elementwise(type(optimizer))
    model_params = {id(p) for p in model.parameters()}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if id(p) not in model_params:
                raise ValueError(
                    f"optimizer param group {gi} holds a tensor of shape {list(p.shape)} that is not a "
                    "parameter of the model; build the optimizer from model.parameters()"
                )


NONFINITE_POLICIES = ("error", "skip")


class NonFiniteError(FloatingPointError):
    """A step's gradients hold a NaN or an inf (bf16 or fp32); the message names the step and parameter."""


class LossScaler:
    """Dynamic loss scaling for fp16: halve on overflow, double after `growth_interval` good steps."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0


class ElixirOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` over the chunks' fp32 master shards."""

    def __init__(self, optimizer: torch.optim.Optimizer, chunks, runtime, *, overlap: bool = False,
                 grad_accum: int = 1, nonfinite: str = "error") -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r}: use 'error' (stop, naming the step and the parameter) "
                             "or 'skip' (skip the step and count it)")
        self.nonfinite = nonfinite
        """What a NaN or inf gradient in bf16 or fp32 does: "error" (the default: the step is not taken and a
        NonFiniteError names it and the first parameter) or "skip" (the step is skipped and counted). fp16
        keeps dynamic loss scaling, which skips overflowing steps by design."""
        self.nonfinite_steps = 0
        self.runtime = runtime
        # chunks whose master and states live on disk (elixir/optim/ondisk.py); the runtime owns the file
        self.disk = DiskChunks(self, runtime.disk) if runtime.disk is not None else None
        self.chunks = [c for c in chunks if c.master is not None]
        # the whole run: chunks of several groups (expert parallel) each count once in the norm
        self.group = runtime.world
        self.inner_class = type(optimizer)
        self.scaler = LossScaler(enabled=chunks[0].dtype == torch.float16)
        self.skipped_steps = 0
        self.steps = 0  # calls of step(), skipped ones included (checkpoints keep it)
        self._built = True  # False while pending (see `pending`)
        self._unscaled = False
        self._overflow = False  # this step's verdict, once `_unscaled`
        self._state_bytes = {"device": 0, "host": 0}
        groups = []
        for gi, g in enumerate(optimizer.param_groups):
            hp = {k: v for k, v in g.items() if k != "params"}
            groups.append({**hp, "params": [c.master for c in self.chunks if c.optim_group == gi]})
        super().__init__(groups, dict(optimizer.defaults))
        # one stepper per chunk: the user's class over that chunk's master alone
        self._steppers: dict[int, torch.optim.Optimizer] = {}
        for c in self.chunks:
            stepper = self._make_inner([{**_hyper(self.param_groups[c.optim_group]), "params": [c.master]}],
                                       optimizer.defaults)
            stepper.state = self.state  # one state dict, keyed by master shards
            self._steppers[c.index] = stepper
        self.speculation: Speculation | None = None
        if overlap and self.chunks and Speculation.supported(self.inner_class, self.param_groups):
            self.speculation = self._make_speculation(grad_accum)

    @classmethod
    def pending(cls, optimizer: torch.optim.Optimizer) -> ElixirOptimizer:
        """An optimizer for a model whose chunks are made at its first forward (see [Note: planning
        on the first forward] in runtime/wrap.py): its param groups hold the hyper-parameters (lr
        schedulers may be made on it now); `zero_grad` does nothing and `step` is an error until
        `attach` makes it the real one."""
        self = cls.__new__(cls)
        self.param_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.defaults = dict(optimizer.defaults)
        self.state = {}
        self._built = False
        # the hook registries torch.optim.Optimizer's methods read (its step wrapper reads them before our
        # step, once any optimizer of this class has been built): empty, and kept by `attach`
        for name in _HOOK_REGISTRIES:
            setattr(self, name, OrderedDict())
        return self

    def attach(self, optimizer: torch.optim.Optimizer, chunks, runtime, **kwargs) -> None:
        """Make a pending optimizer the real one, keeping its param-group dicts (schedulers hold them)
        and whatever hyper-parameters were set on them meanwhile."""
        groups = self.param_groups
        hooks = {name: getattr(self, name) for name in _HOOK_REGISTRIES}
        for user_group, g in zip(optimizer.param_groups, groups):
            user_group.update(g)
        ElixirOptimizer.__init__(self, optimizer, chunks, runtime, **kwargs)
        for name, registry in hooks.items():  # hooks registered while pending stay registered
            setattr(self, name, registry)
        for old, new in zip(groups, self.param_groups):
            old.clear()
            old.update(new)
        self.param_groups[:] = groups

    def _require_built(self) -> None:
        if not self._built:
            raise ValueError(
                "the model has not run a forward yet: with plan='auto' and no example_batch, elixir.wrap "
                "makes the chunks (and this optimizer's state) at the first forward; run one first"
            )

    def _make_speculation(self, grad_accum: int) -> Speculation:
        """The update inside backward, with a rollback log per host chunk (compute dtype) when gradients
        are not held between micro-batches anyway (see the Note in overlap.py). Allocated now, once:
        nothing is allocated per step."""
        logs: dict[int, torch.Tensor] = {}
        if grad_accum == 1:
            for c in self.chunks:
                if c.optim_home == "host" and c.master is not c.shard:
                    # pinned on a GPU: the gradient's copy to the host writes it (`Speculation.copied_down`)
                    logs[c.index] = self.runtime.tracker.empty(c.shard_numel, c.dtype, "host", pin=True)
                elif c.optim_home == "disk":  # in the chunk's disk region
                    logs[c.index] = self.runtime.disk.parked(c.shard_numel, c.dtype)
        return Speculation(self, grad_accum=grad_accum, logs=logs)

    def loaded(self, chunk, *, write_back: bool = False):
        """A context in which `chunk`'s master and optimizer states are in memory: a disk chunk's region is
        read for it (and written back after it when `write_back`); every other chunk's already is."""
        if chunk.optim_home != "disk" or chunk.master is None:
            return nullcontext()
        return self.disk.loaded(chunk, write_back=write_back)

    def write_shard(self, chunk, *, stream=None, staging=None):
        """Cast a disk chunk's updated master (in memory now) into its parameter shard; on CUDA on `stream`,
        returning the event after which the master's buffer may be reused."""
        if stream is None:
            self.runtime.copy_between(chunk.shard, chunk.master, staging=staging)
            return None
        stream.wait_stream(torch.cuda.current_stream(self.runtime.device))
        with torch.cuda.stream(stream):
            self.runtime.copy_between(chunk.shard, chunk.master, staging=staging)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def stepper_of(self, chunk) -> torch.optim.Optimizer:
        return self._steppers[chunk.index]

    def hyper_of(self, chunk) -> dict:
        """The hyper-parameters the chunk's update uses now (its user group's, as schedulers set them)."""
        return _hyper(self.param_groups[chunk.optim_group])

    def _make_inner(self, groups, defaults) -> torch.optim.Optimizer:
        cls = self.inner_class
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in defaults.items() if k in accepted}
        if cls in _FUSED:
            fused = [{**g, "fused": True, "foreach": None} for g in groups]
            try:
                return cls(fused, **{**kwargs, "fused": True, "foreach": None})
            except (RuntimeError, ValueError):
                pass
        return cls(groups, **kwargs)

    # --- the step ----------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """`loss.backward()`, with the loss scaled when computing in fp16."""
        self.runtime.settle_backward()
        if self.scaler.enabled:
            loss = loss * self.scaler.scale
        loss.backward(**kwargs)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def _speculated(self) -> dict:
        """This step's updates that ran during backward (waited for), by chunk index."""
        spec = self.speculation
        if spec is None or not spec.pending:
            return {}
        return {r.chunk.index: r for r in spec.wait()}

    def _unscale(self) -> bool:
        """Check the gradients once per step (dividing them by the loss scale in fp16); True when any rank
        found an inf or NaN: fp16 overflow, or a non-finite gradient in bf16 or fp32 (see `nonfinite`).
        Chunks updated during backward were unscaled and checked by their update."""
        if self._unscaled:
            return self._overflow
        recs = self._speculated()
        inv = 1.0 / self.scaler.scale
        dev = self._comm_device()
        found = torch.zeros((), dtype=torch.float32, device=dev)
        for c in self.chunks:
            rec = recs.get(c.index)
            if rec is not None:
                finite = rec.finite if torch.is_tensor(rec.finite) else torch.tensor(rec.finite)
                found = torch.maximum(found, (~finite).float().to(dev))
                continue
            g = c.master.grad
            if g is None:
                continue
            if self.scaler.enabled:
                g.mul_(inv)
                found = torch.maximum(found, (~torch.isfinite(g)).any().float().to(dev))
            else:  # one read of the gradient: a NaN or inf anywhere makes the sum one
                found = torch.maximum(found, (~torch.isfinite(g.sum())).float().to(dev))
        found = comm.all_reduce_max(found, self.group)  # every rank decides alike
        self._overflow = bool(found.item())
        self._unscaled = True
        return self._overflow

    def _comm_device(self) -> torch.device:
        return self.runtime.device

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of all chunks by their global norm; returns the norm before clipping,
        like `torch.nn.utils.clip_grad_norm_` (the same formula, over all ranks' shards). Updates that
        ran during backward are redone with the clipped gradient when the clip acts."""
        self._require_built()
        # fp16: unscale and find overflow first; bf16 and fp32: the norms below tell whether any gradient
        # holds a NaN or an inf, so the separate check of step() is not needed
        overflow = self._unscale() if self.scaler.enabled or self._unscaled else None
        norm_type = float(norm_type)
        spec = self.speculation
        # whether reading the clip's coefficient costs no wait that this call does not make anyway: in bf16 and
        # fp32 the non-finite flag below waits for the norms, with updates inside backward the coefficient is read
        # to check them, and on a CPU device nothing runs ahead
        coef_is_free = overflow is None or spec is not None or self._comm_device().type == "cpu"
        recs = self._speculated()
        if spec is not None:
            spec.norm_type = norm_type  # what the next backward's updates compute their norms in
        norms, grads = [], []
        for c in self.chunks:
            rec = recs.get(c.index)
            # a shard held by several ranks (sharded inside nodes) counts once: see [Note: hierarchical
            # sharding] in elixir/parallel/nodes.py
            counted = c.group.counts_once
            if rec is not None:
                same = rec.norm is not None and rec.norm_type == norm_type and not spec.clipped
                if counted:
                    norms.append(rec.norm if same else chunk_norm(spec.gradient_of(rec), norm_type))
            elif c.master.grad is not None:
                if counted:
                    norms.append(chunk_norm(c.master.grad, norm_type))
                grads.append(c.master.grad)
        dev = self._comm_device()
        if norm_type == math.inf:
            local = max((n.to(dev) for n in norms), default=torch.zeros((), device=dev))
            total = comm.all_reduce_max(local.clone(), self.group)
        else:
            local = torch.zeros((), dtype=torch.float32, device=dev)
            for n in norms:
                local += n.to(dev) ** norm_type
            total = comm.all_reduce_sum(local, self.group) ** (1.0 / norm_type)
        if overflow is None:
            bad = torch.zeros((), dtype=torch.float32, device=dev)
            if norms:
                bad = (~torch.isfinite(torch.stack([n.to(dev) for n in norms]))).any().float()
            self._overflow = overflow = bool(comm.all_reduce_max(bad, self.group).item())
            self._unscaled = True
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if overflow:  # the step is skipped or refused (see step): nothing to scale or redo
            return total
        # there, a clip that does not act (coefficient 1) leaves the gradients alone: multiplying by one is a pass
        # over every gradient that changes no value
        value = coef.item() if coef_is_free else None  # read once: each read copies it from the device
        if value is None or value < 1.0:
            for g in grads:
                g.mul_(coef.to(g.device))
        if spec is not None:  # (its coefficient is free: read above)
            if recs and not spec.holds(value):
                spec.redo_clipped(value)
            spec.clip_coef, spec.clipped = value, True
        return total

    @torch.no_grad()
    def step(self, closure=None):
        self._require_built()
        self.runtime.settle_backward()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        spec = self.speculation
        overflow = self._unscale()
        recs = self._speculated()
        if overflow and not self.scaler.enabled:  # a NaN or inf gradient in bf16 or fp32
            where = self._first_nonfinite(recs)
            if recs:
                spec.rollback("nonfinite")
            if spec is not None:
                spec.end_step()
            self._unscaled = self._overflow = False
            self.zero_grad()
            if self.nonfinite == "error":
                raise NonFiniteError(
                    f"step {self.steps + 1}: non-finite gradients ({where}); the step was not taken and the "
                    "model is as before it. Look for the cause (learning rate, data, loss), or skip such steps "
                    "with nonfinite='skip' (elixir.wrap) or --nonfinite skip (elixir train)"
                )
            self.steps += 1
            self.skipped_steps += 1
            self.nonfinite_steps += 1
            return loss
        self.steps += 1
        self.scaler.update(overflow)
        self._unscaled = False
        self._overflow = False
        if overflow:
            self.skipped_steps += 1
            if recs:
                spec.rollback("overflow")
            if spec is not None:
                spec.end_step()
            self.zero_grad()
            return loss
        if recs and not spec.clipped and not spec.holds(1.0):
            spec.redo_clipped(1.0)  # a clip was speculated from the last step, but this one has none
        later = [c for c in self.chunks if c.index not in recs and c.master.grad is not None]
        on_disk = [c for c in later if c.optim_home == "disk"]
        for c in later:  # what did not run during backward runs now
            if c.optim_home == "disk":
                self.disk.read_ahead(on_disk[on_disk.index(c):])
                with self.disk.loaded(c, write_back=True, wait=False):
                    self._step_chunk(c)
                    self.write_shard(c)
            else:
                self._step_chunk(c)
        if spec is not None:
            spec.confirm()
            spec.end_step()
        self._write_back({i for i, r in recs.items() if r.shard_written},
                         {i for i, r in recs.items() if not r.shard_written})
        self.runtime.wait_pending()
        self._count_state_bytes()
        return loss

    def _first_nonfinite(self, recs: dict) -> str:
        """Where this rank's first non-finite gradient is: the parameter, or that another rank has it."""
        for c in self.chunks:
            rec = recs.get(c.index)
            if rec is not None:
                g = self.speculation.gradient_of(rec)
            else:
                g = c.master.grad
            if g is None or bool(torch.isfinite(g.sum())):
                continue
            bad = ~torch.isfinite(g)
            base = c.shard_slice.start
            for s in c.slots:
                lo, hi = max(s.offset, base), min(s.offset + s.numel, base + c.shard_numel)
                if lo < hi and bool(bad[lo - base : hi - base].any()):
                    return f"first in parameter {s.name!r}, chunk {c.index}"
            return f"first in chunk {c.index}'s padding"
        return "on another rank"

    def _step_chunk(self, c) -> None:
        stepper = self._steppers[c.index]
        stepper.param_groups[0].update(self.hyper_of(c))
        stepper.step()

    def _write_back(self, written: set[int] = frozenset(), deferred: set[int] = frozenset()) -> None:
        """Cast the updated masters into the parameter shards, wherever those live (a shard derived
        from its master is not stored: the next fetch casts it), then let the runtime gather and drop
        what the new shards make stale. `written`: chunks whose update inside backward wrote theirs
        already; a disk chunk's update always does, except the `deferred` ones."""
        rt = self.runtime

        def write(c) -> None:
            if c.shard is None or c.master is c.shard or c.index in written:
                return
            if c.optim_home != "disk":
                rt.copy_between(c.shard, c.master)
            elif c.index in deferred:  # its update inside backward could not write its shard yet
                with self.disk.loaded(c):
                    rt.copy_between(c.shard, c.master)

        rt.shards_changed(self.chunks, reason="updated", write=write)

    def _count_state_bytes(self) -> None:
        now = {"device": 0, "host": 0}
        for c in self.chunks:
            if c.optim_home == "disk":
                continue  # in its region of the scratch file, counted there
            for v in self.state.get(c.master, {}).values():
                if torch.is_tensor(v) and v.numel() > 1:
                    now[c.optim_home] += v.numel() * v.element_size()
        for tier in now:
            self.runtime.tracker.count(tier, now[tier] - self._state_bytes[tier])
        self._state_bytes = now

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._built:
            return  # no gradients before the first forward (see `pending`)
        self.runtime.settle_backward()
        spec = self.speculation
        if spec is not None:
            if spec.pending:  # updates of a backward whose step never came
                spec.rollback("zero_grad")
            spec.forget_backwards()
        for c in self.chunks:
            if c.master.grad is None:
                continue
            if set_to_none:
                self.runtime.grads.drop_master_grad(c)
            else:
                c.master.grad.zero_()
        self._unscaled = False

    def speculation_state(self) -> dict:
        """What the update inside backward has learned (a checkpoint keeps it, so that a resumed run
        speculates as the uninterrupted one would): see [Note: the step inside backward]."""
        spec = self.speculation
        if spec is None:
            return {}
        return {"clip_coef": spec.clip_coef, "norm_type": spec.norm_type, "backwards": spec.expected_backwards}

    def load_speculation_state(self, state: dict) -> None:
        spec = self.speculation
        if spec is None or not state:
            return
        spec.clip_coef = float(state["clip_coef"])
        spec.norm_type = None if state["norm_type"] is None else float(state["norm_type"])
        spec.expected_backwards = int(state["backwards"])

    def scalar_state_dict(self) -> dict:
        """The optimizer's state apart from its tensors, as JSON values (a checkpoint's manifest keeps it):
        the inner class's name, the step counters, the loss scale and its good steps, the param groups'
        hyper-parameters (tensor ones as numbers or lists) and what the update inside backward learned."""
        return {
            "class": self.inner_class.__name__, "steps": self.steps, "skipped_steps": self.skipped_steps,
            "loss_scale": self.scaler.scale, "good_steps": self.scaler.good_steps,
            "param_groups": [_jsonable_hyper(g) for g in self.param_groups],
            "speculation": self.speculation_state(),
        }

    def load_scalar_state_dict(self, state: dict) -> None:
        """Restore what `scalar_state_dict` returned (its hyper-parameters checked by the caller against the
        param groups: see `check_param_groups` in elixir/checkpoint/manifest.py); hyper-parameters that are
        tensors here keep their values. Then counts the bytes of the optimizer states, which
        `load_chunk_state` may have replaced."""
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]
        self.scaler.scale = state["loss_scale"]
        self.scaler.good_steps = state["good_steps"]
        self.load_speculation_state(state.get("speculation") or {})
        for g, saved in zip(self.param_groups, state["param_groups"]):
            for k, v in saved.items():
                if k in g and not isinstance(g[k], torch.Tensor):
                    g[k] = tuple(v) if isinstance(g[k], tuple) else v
        self._count_state_bytes()

    def load_chunk_state(self, chunk, states: dict[str, torch.Tensor]) -> None:
        """Replace `chunk`'s optimizer states with `states` (as a checkpoint holds them: on the host, any
        dtype; none when the chunk had none yet), placed where torch's optimizers keep them: a scalar `step`
        in fp32 on the host unless the optimizer is fused or capturable, everything else beside the master
        in its dtype. `load_scalar_state_dict` counts their bytes."""
        self.state.pop(chunk.master, None)
        if not states:
            return
        group = self._steppers[chunk.index].param_groups[0]
        placed = {}
        for k, v in states.items():
            if k == "step" and not (group.get("fused") or group.get("capturable")):
                placed[k] = v.to(dtype=torch.float32)
            else:
                placed[k] = v.to(device=chunk.master.device, dtype=v.dtype if k == "step" else chunk.master.dtype)
        self.state[chunk.master] = placed

    def step_stats(self) -> dict:
        """Steps, skipped steps, and what the update inside backward did (see elixir.step_stats)."""
        out = {"steps": self.steps, "skipped_steps": self.skipped_steps, "nonfinite_steps": self.nonfinite_steps,
               "overlap": self.speculation is not None,
               "speculated_steps": 0, "rollbacks": 0, "rollback_reasons": {}, "late_gradients": 0, "clip_pauses": 0,
               "update_s": 0.0, "update_wait_s": 0.0, "staging_wait_s": self.runtime.grads.staging_wait_s,
               **dict.fromkeys(UPDATE_PARTS, 0.0)}
        if self.speculation is not None:
            out.update(self.speculation.stats())
        return out


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "fused", "foreach")}


def _jsonable_hyper(group: dict) -> dict:
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        if torch.is_tensor(v):
            v = v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, (tuple, list)):
            v = list(v)
        out[k] = v
    return out
