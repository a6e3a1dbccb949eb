"""Trace one training step on the meta device: the operators, the parameters each reads, FLOPs, activation bytes.

`profile(model, batch)` runs one forward and backward with every parameter, buffer and input replaced by a
meta tensor of the same shape, so nothing is computed and no memory is allocated however large the model is.
A `TorchDispatchMode` sees every aten operator of the step, in forward and in backward (activation-checkpointed
regions recompute in backward, and are seen there), and records what the planner needs: the order in which
parameters are used, the FLOPs of every operator, and the bytes of activations alive after it.

[Note: parameters are matched by storage]
Autograd saves `weight.t()` for backward and modules hand views of parameters around, so the tensors an
operator receives are rarely the parameter objects themselves. Every view of a tensor shares its
StorageImpl (on the meta device too), so a parameter is recognised by the identity of its storage
(`untyped_storage()._cdata`). A tied parameter (one tensor under two names) has one storage, hence one name:
the first one `named_parameters()` gives.

[Note: activation bytes are counted per storage]
A storage created by an operator is counted once, whatever the number of views of it, from the operator that
creates it until a weak reference to it says it died. Storage Python objects are preserved for as long as the
storage lives, so the weak reference fires exactly when the last tensor or view of it goes. Gradients of
parameters are created by operators too; the post-accumulate-grad hook moves them from the activation
counter to the gradient counter when they become a `.grad`.

[Note: attention on the meta device]
On the meta device `scaled_dot_product_attention` chooses its math path, which materialises the (T, T)
attention matrices, while CUDA and the CPU run a fused kernel that keeps only the output and a log-sum-exp
per row. Tracing the math path would overstate activations by the attention matrices of every layer (for
OPT-30B at 1024 tokens, ~0.1 GB per matrix per layer), so a torch function mode redirects the call to the
fused CPU kernel, whose meta implementation saves what the fused GPU kernels save (up to a few bytes per
row). Two limits: grouped-query attention repeats the key/value heads first (GPU kernels read them in
place: a small overstatement), and a call nested in another overridable torch function (e.g. inside
`F.multi_head_attention_forward`) runs while the mode is switched off and keeps the math path. For the same
reason the step's backward is started through the autograd engine directly, not `loss.backward()`: see
`_TrainingStep`.

[Note: values read on the meta device]
Meta tensors have no values, but models sometimes read one in forward: Hugging Face models check
`attention_mask.all()` to skip an all-ones mask. Such a read (`aten._local_scalar_dense`) is answered with
True (bool), 1 (integer) or 1.0 (float): a full mask, a nonzero count, so the trace takes the usual branch of
a training step. `Profile.assumed_values` counts them; when a branch depends on the data, the runtime follows
the profiled order where the run agrees with it and falls back to least-recently-used eviction where not.

The data it makes, `Profile` and `OpRecord`, live in elixir/profile/data.py.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.variable import Variable
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

from elixir.plan import DTYPES, dtype_name
from elixir.profile.data import OpRecord, Profile

__all__ = ["OpRecord", "Profile", "profile"]

_aten = torch.ops.aten
# torch's FLOP formulas, plus the fused CPU attention kernels the tracer uses (see [Note: attention on the
# meta device]); their leading arguments are those of the CUDA kernels' formulas.
def _grouped_mm_flop(a: Tensor, b: Tensor, *args, out_val: Tensor | None = None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm (Hugging Face's MoE experts run on it; torch has no formula for it). Every
    row of the ragged operand meets one group's matrix: 2 x the output's elements x the contracted size,
    except when both operands are 2-D (ragged on the contracted dimension: the weight gradient), where the
    groups split the contracted size: 2 x one group's output x the whole contracted size."""
    if a.dim() == 2 and b.dim() == 2:
        return 2 * a.shape[0] * b.shape[1] * a.shape[1]
    return 2 * out_val.numel() * a.shape[-1]


_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    **flop_registry,
    _aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
}
if hasattr(_aten, "_grouped_mm"):
    _FLOP_FORMULAS[_aten._grouped_mm] = _grouped_mm_flop


# ---------------------------------------------------------------------------------------------------------------
# tracing

# (is floating point, is bool) -> the value a meta tensor's `.item()` is taken to have.
_ASSUMED_VALUE = {(False, True): True, (False, False): 1, (True, False): 1.0}

# [Note: grouped matrix products on the meta device]
# torch._grouped_mm (Hugging Face's MoE experts use it) has CPU and CUDA kernels for several dtypes, but its
# meta kernel accepts bfloat16 only, so an fp32 model that trains fine could not be traced. On the meta
# device only shapes matter: the trace computes the product's shape in bfloat16 and gives the result the
# dtype the real kernel would (out_dtype, else the inputs').
_GROUPED_MM = getattr(_aten, "_grouped_mm", None)


def _meta_grouped_mm(func, args, kwargs):
    out_dtype = kwargs.get("out_dtype") or args[0].dtype
    cast = [a.to(torch.bfloat16) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    kw = {k: (v.to(torch.bfloat16) if isinstance(v, Tensor) and v.is_floating_point() else v)
          for k, v in kwargs.items() if k != "out_dtype"}
    return func(*cast, **kw).to(out_dtype)


def _storage_of(t: Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return None


def _storage_key(t: Tensor) -> int | None:
    storage = _storage_of(t)
    return None if storage is None else storage._cdata


class _StepTracer(TorchDispatchMode):
    """Records every operator; keeps the live activation and gradient byte counters."""

    def __init__(self, param_of_storage: dict[int, str], model_state_storages: set[int]) -> None:
        super().__init__()
        self.param_of_storage = param_of_storage
        self.model_state_storages = model_state_storages  # parameters and buffers: never activations
        self.phase = "forward"
        self.ops: list[OpRecord] = []
        # storage key -> [weakref to the storage, bytes, is a gradient]
        self.live: dict[int, list] = {}
        self.activation_bytes = 0
        self.grad_bytes = 0
        self.peak_activation_bytes = 0
        self.peak_grad_bytes = 0
        self._names: dict[Any, str] = {}
        self.assumed_values = 0
        self.grad_arrivals: dict[str, list[int]] = {}

    # -- storage accounting (see [Note: activation bytes are counted per storage]) --

    def track(self, storage: torch.UntypedStorage, as_grad: bool = False) -> int:
        """Count `storage` from now until it dies, once however many views of it exist; its bytes if it is
        new, else 0."""
        key = storage._cdata
        if key in self.model_state_storages:
            return 0
        entry = self.live.get(key)
        if entry is not None:
            if entry[0]() is storage:
                if as_grad and not entry[2]:
                    self._move_to_grads(entry)
                return 0
            self._died(key)  # a dead storage's address reused before its callback ran
        nbytes = storage.nbytes()
        self.live[key] = [weakref.ref(storage, lambda _, key=key: self._died(key)), nbytes, as_grad]
        if as_grad:
            self.grad_bytes += nbytes
        else:
            self.activation_bytes += nbytes
        return nbytes

    def _move_to_grads(self, entry: list) -> None:
        entry[2] = True
        self.activation_bytes -= entry[1]
        self.grad_bytes += entry[1]

    def _died(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is None:
            return
        if entry[2]:
            self.grad_bytes -= entry[1]
        else:
            self.activation_bytes -= entry[1]

    def grad_accumulated(self, param: Tensor) -> None:
        name = self.param_of_storage.get(_storage_key(param))
        if name is not None:
            self.grad_arrivals.setdefault(name, []).append(len(self.ops))
        if param.grad is not None:
            self.track(param.grad.untyped_storage(), as_grad=True)
            # The last gradients become .grad after the last operator: count them in the peak here.
            self.peak_grad_bytes = max(self.peak_grad_bytes, self.grad_bytes)

    # -- the dispatch hook --

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default and args[0].device.type == "meta":
            # See [Note: values read on the meta device].
            self.assumed_values += 1
            return _ASSUMED_VALUE[args[0].dtype.is_floating_point, args[0].dtype == torch.bool]
        if (_GROUPED_MM is not None and func._overloadpacket is _GROUPED_MM and args[0].device.type == "meta"
                and args[0].dtype != torch.bfloat16):
            out = _meta_grouped_mm(func, args, kwargs)  # see [Note: grouped matrix products on the meta device]
        else:
            out = func(*args, **kwargs)

        params: list[str] = []
        param_of_storage = self.param_of_storage
        for t in _tensors_in(args, kwargs):
            name = param_of_storage.get(_storage_key(t))
            if name is not None and name not in params:
                params.append(name)
        out_bytes = 0
        for t in _tensors_in(out):
            storage = _storage_of(t)
            if storage is not None:
                out_bytes += self.track(storage)

        formula = _FLOP_FORMULAS.get(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = str(func)
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.activation_bytes)
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.grad_bytes)
        self.ops.append(
            OpRecord(name, self.phase, tuple(params), flops, self.activation_bytes, self.grad_bytes, out_bytes,
                     moved_bytes(func, args, kwargs, out))
        )
        return out


# [Note: what a memory-bound operator costs]
# An operator without FLOPs by the formulas (elementwise, normalisation, softmax, reductions, copies, cat) is
# bound by memory: it reads its inputs and writes its outputs once. `moved_bytes` counts both, by the tensors'
# sizes (a view argument counts the elements it spans, not its base; an in-place operator's output is its input,
# read and written). A view operator moves nothing: it only makes a new tensor header. The cost model divides
# these bytes by a rate `Hardware.measure()` times on such operators counted the same way, at several sizes (see
# `eager_rates` in elixir/hardware/record.py: an operator whose tensors stay in the caches runs several times
# faster than one streaming from memory), and adds the per-operator overhead to every operator.
# Some operators alias without being views to autograd (`aten._unsafe_view`, which every reshape of a
# non-contiguous gradient and many matmul outputs go through): an operator that mutates nothing and whose
# outputs all share an input's storage moves nothing either.
def moved_bytes(func, args, kwargs, out) -> int:
    """Bytes operator `func` reads and writes given its arguments and result; 0 for a view operator, or one
    whose outputs alias its inputs without writing them."""
    if getattr(func, "is_view", False):
        return 0
    inputs, outputs = _tensors_in(args, kwargs), _tensors_in(out)
    schema = getattr(func, "_schema", None)
    if outputs and schema is not None and not schema.is_mutable:
        held = {_storage_key(t) for t in inputs} - {None}
        if all(_storage_key(t) in held for t in outputs):
            return 0
    return sum(t.numel() * t.element_size() for t in inputs + outputs)


def _tensors_in(*trees) -> list[Tensor]:
    """The tensors among operator arguments or outputs: flat, or in lists/tuples/dicts one level deep."""
    found: list[Tensor] = []
    for tree in trees:
        items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else (tree,)
        for item in items:
            if isinstance(item, Tensor):
                found.append(item)
            elif isinstance(item, (list, tuple)):
                found.extend(x for x in item if isinstance(x, Tensor))
    return found


class _FusedAttentionOnMeta(TorchFunctionMode):
    """Redirect `scaled_dot_product_attention` on meta tensors to a fused kernel: see
    [Note: attention on the meta device]."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            fused = _fused_attention(*args, **kwargs)
            if fused is not None:
                return fused
        return func(*args, **kwargs)


def _fused_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor | None:
    if query.device.type != "meta" or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None
    if key.shape[1] != query.shape[1]:
        if not enable_gqa or query.shape[1] % key.shape[1] != 0:
            return None
        # GQA: GPU kernels read shared key/value heads in place; repeating them here overstates a little.
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if value.shape[-1] != query.shape[-1]:
        return None
    out, _ = _aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# the entry point


def _to_meta(value: Any, memo: dict[int, Tensor] | None = None) -> Any:
    """`value` with every tensor moved to the meta device; one tensor reached twice (input_ids also passed as
    labels) becomes one meta tensor, so its bytes count once."""
    memo = {} if memo is None else memo
    if isinstance(value, Tensor):
        if id(value) not in memo:
            # A fresh leaf: backward must neither reach the caller's tensor nor set its .grad.
            meta = value.detach().to("meta")
            memo[id(value)] = meta.requires_grad_(value.requires_grad) if value.is_floating_point() else meta
        return memo[id(value)]
    if isinstance(value, Mapping):
        return {k: _to_meta(v, memo) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_to_meta(v, memo) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _default_loss(output: Any) -> Tensor:
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Tensor):
        return output.sum()
    raise ValueError(
        f"cannot find a loss in the model's output of type {type(output).__name__}: it has no tensor `.loss`, "
        "is not a tuple starting with a tensor, nor a tensor; pass loss_fn=... to profile()"
    )


class _TrainingStep(nn.Module):
    """Forward, loss and backward of `model`, as one module call."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], Tensor] | None, tracer: _StepTracer) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.tracer = tracer

    def forward(self, *args: Any, **kwargs: Any) -> None:
        output = self.model(*args, **kwargs)
        loss = self.loss_fn(output) if self.loss_fn is not None else _default_loss(output)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"the loss must be a one-element tensor; got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
                + "; pass a loss_fn that reduces the model's output"
            )
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not require grad: no parameter of the model requires grad, or the model "
                "runs under torch.no_grad(); profile needs a trainable step"
            )
        # A training loop keeps only the loss of the output: let the rest (logits...) die before backward.
        del output
        self.tracer.phase = "backward"
        # Not `loss.backward()` nor `torch.autograd.backward`: torch functions both, and a torch function mode
        # is switched off while it handles one, so checkpointed regions would recompute without
        # _FusedAttentionOnMeta (and fail the checkpoint's check that recomputed shapes match).
        Variable._execution_engine.run_backward(
            (loss,), (torch.ones_like(loss),), False, False, (), True, True
        )  # tensors, grads, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad


def profile(
    model: nn.Module,
    example_batch: Mapping[str, Any] | Tensor,
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    compute_dtype: torch.dtype | str | None = None,
) -> Profile:
    """Trace one forward and backward of `model` on the meta device, without touching its weights.

    example_batch: a dict of tensors, passed as `model(**batch)`, or a tensor, passed as `model(batch)`;
    it is moved to the meta device (its values are not used). The loss is `loss_fn(output)` if given, else
    `output.loss`, else `output[0]` for a tuple, else `output.sum()`. The model runs in its current mode
    (call `.train()` first for a training step) and may live anywhere: its parameters are replaced by meta
    tensors of the same shape (and `compute_dtype`, if given, for floating ones: a torch.dtype or a name such
    as "bf16") through
    `torch.func.functional_call`, so a real model is neither copied nor modified.
    """
    if compute_dtype is not None:
        compute_dtype = DTYPES[dtype_name(compute_dtype)]  # ValueError naming the value for anything else
    if not isinstance(example_batch, (Tensor, Mapping)):
        raise ValueError(
            f"example_batch of type {type(example_batch).__name__}: pass a dict of tensors (model(**batch)) "
            "or a tensor (model(batch))"
        )
    started = time.perf_counter()

    # Distinct parameters by first name; other names of the same tensor are tied to it.
    first_name: dict[int, str] = {}
    tied_names: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            tied_names[name] = first_name[id(p)]
        else:
            first_name[id(p)] = name
    meta_params: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        dtype = compute_dtype if compute_dtype is not None and p.is_floating_point() else p.dtype
        meta_params[name] = torch.empty_strided(
            p.shape, p.stride(), dtype=dtype, device="meta", requires_grad=p.requires_grad
        )
    meta_buffers = {name: _to_meta(b) for name, b in model.named_buffers()}
    batch = _to_meta(example_batch)

    param_of_storage = {t.untyped_storage()._cdata: name for name, t in meta_params.items()}
    model_state = set(param_of_storage) | {b.untyped_storage()._cdata for b in meta_buffers.values()}
    tracer = _StepTracer(param_of_storage, model_state)
    for t in _tensors_in(batch):  # the batch is alive for the whole step
        tracer.track(t.untyped_storage())
    hooks = [
        p.register_post_accumulate_grad_hook(tracer.grad_accumulated) for p in meta_params.values() if p.requires_grad
    ]
    # The meta tensors must stand in for the parameters during backward too, where checkpointed regions run
    # the modules' forward again: so backward runs inside the functional call, as part of the step module.
    step = _TrainingStep(model, loss_fn, tracer)
    state = {f"model.{name}": t for name, t in {**meta_params, **meta_buffers}.items()}
    args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else ((batch,), {})
    from elixir.parallel.moe import recording_all_to_all

    try:
        with torch.enable_grad(), _FusedAttentionOnMeta(), tracer, recording_all_to_all() as all_to_all:
            torch.func.functional_call(step, state, args, kwargs)
    finally:
        for hook in hooks:
            hook.remove()

    forward_flops = sum(op.flops for op in tracer.ops if op.phase == "forward")
    backward_flops = sum(op.flops for op in tracer.ops if op.phase == "backward")
    return Profile(
        ops=tracer.ops,
        param_shapes={name: tuple(p.shape) for name, p in meta_params.items()},
        param_numels={name: p.numel() for name, p in meta_params.items()},
        peak_activation_bytes=tracer.peak_activation_bytes,
        forward_flops=forward_flops,
        backward_flops=backward_flops,
        total_flops=forward_flops + backward_flops,
        param_dtypes={name: str(p.dtype).removeprefix("torch.") for name, p in meta_params.items()},
        tied_names=tied_names,
        peak_grad_bytes=tracer.peak_grad_bytes,
        assumed_values=tracer.assumed_values,
        trace_seconds=time.perf_counter() - started,
        grad_arrivals=tracer.grad_arrivals,
        all_to_all=[tuple(t) for t in all_to_all],
    )
