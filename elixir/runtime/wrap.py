"""wrap(): put a model's parameters into chunks placed by a plan, and hook it up.

The model stays the same object (HF models keep `config`, `generate`, ...); its parameters stay the
same `nn.Parameter` objects, whose `.data` become views of chunk memory. The optimizer returned
updates the chunks' fp32 masters with the user's own optimizer class and hyper-parameters.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from elixir import accel, comm, parallel
from elixir.memory import BlockCache, Chunk, ChunkGroup, MemoryTracker, pack_offsets, use_order
from elixir.memory.chunk import ParamSlot, empty_like_shape, padded_numel
from elixir.memory.disk import DiskStore, check_scratch_folder, region_bytes
from elixir.memory.host import keep_freed_host_memory
from elixir.models.checkpointing import apply_checkpointing
from elixir.optim import ElixirOptimizer, check_optimizer
from elixir.optim.ondisk import disk_state_tensors
from elixir.optim.overlap import STAGING_BUFFERS, UPDATE_PARTS, Speculation
from elixir.parallel import nodes
from elixir.plan import SHARD_OVER, Plan, named_parameters, optimizer_group_of
from elixir.runtime.hooks import Interceptor
from elixir.runtime.state import Runtime
from elixir.shm import SharedArena

_STATE_ATTR = "_elixir_runtime"
_LAZY_ATTR = "_elixir_lazy"


def _node_layout(plan: Plan, process_group, group: ChunkGroup):
    """The nodes every rank agrees on, for a plan with chunks sharded inside nodes (collective); ValueError
    when the environment does not describe them, or describes other nodes than the plan's."""
    if group.size > 1 and process_group is not dist.group.WORLD:
        raise ValueError(
            "the plan shards chunks inside nodes (shard_over='node'), which needs the default process group; "
            "call elixir.wrap without process_group, or use shard_over='world'"
        )
    layout = nodes.agreed_node_layout(group)
    if layout.nodes != plan.nodes:
        raise ValueError(
            f"the plan was made for {plan.nodes} node(s) of {plan.world_size // plan.nodes} ranks but this run has "
            f"{layout.nodes} of {layout.ranks_per_node} (torchrun's LOCAL_WORLD_SIZE); make the plan again with "
            f"nodes={layout.nodes}"
        )
    return layout


def _default_plan(model, optimizer, compute_dtype, world_size) -> Plan:
    # Until the planner searches, "auto" keeps everything resident on the device (ZeRO-2 when
    # sharded), which is the fastest layout whenever it fits.
    biggest = max(p.numel() for _, p in named_parameters(model))
    itemsize = torch.empty((), dtype=compute_dtype).element_size() if compute_dtype else 4
    chunk_mib = max(32.0, biggest * itemsize / 2**20 + 1 / 1024)
    return Plan.uniform(
        model, chunk_mib=chunk_mib, cache_blocks=0, resident=True,
        compute_dtype=compute_dtype or torch.float32, world_size=world_size, optimizer=optimizer,
    )


def wrap(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: Plan | str = "auto",
    *,
    compute_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    process_group=None,
    example_batch=None,
    loss_fn=None,
    hardware=None,
    disk: str | None = None,
    nonfinite: str = "error",
    shard_over: str = "auto",
    _into: ElixirOptimizer | None = None,
) -> tuple[torch.nn.Module, ElixirOptimizer]:
    """Manage `model`'s parameters in chunks placed by `plan`; return (model, optimizer).

    `plan="auto"` profiles one step on the meta device, measures the hardware (cached, or
    `hardware=`) and searches the fastest plan that fits (see elixir.plan). It profiles
    `example_batch` when given; otherwise the model's first forward call: the chunks are made then,
    before that forward runs, and the optimizer returned here starts working then (see
    [Note: planning on the first forward]). On several ranks rank 0's plan is used by all.

    `disk`: the scratch folder of chunks whose plan puts their optimizer on disk (default: the plan's
    `disk_path`); each rank keeps one preallocated file there while the model lives.

    `shard_over`: with plan="auto" on several nodes, "world" or "node" fixes how the searched plan shards
    its chunks (see [Note: hierarchical sharding] in elixir/parallel/nodes.py); "auto" lets the search choose.

    `nonfinite`: what a NaN or inf gradient does in bf16 and fp32 (fp16 skips overflowing steps by its loss
    scaling): "error" (default) refuses the step and raises `elixir.NonFiniteError` naming it and the first
    parameter, the model as before the step; "skip" skips and counts it (`elixir.step_stats`).

    Every check runs before anything is allocated: a plan for another model or world size, an
    optimizer that does not hold the model's parameters, a dtype the device lacks, a cache too
    small for a module's parameters, a scratch folder missing, read-only or too small for the disk
    chunks are all `ValueError`s.
    """
    if hasattr(model, _STATE_ATTR) or hasattr(model, _LAZY_ATTR):
        raise ValueError("this model is already wrapped by elixir.wrap; wrap the original model once")
    device = torch.device(device) if device is not None else accel.default_device()
    if process_group is None and dist.is_available() and dist.is_initialized():
        process_group = dist.group.WORLD
    if process_group is not None:
        group = ChunkGroup(process_group, dist.get_rank(process_group), dist.get_world_size(process_group))
    else:
        group = ChunkGroup.single()

    if shard_over not in ("auto", *SHARD_OVER):
        raise ValueError(f"shard_over={shard_over!r}: use 'auto', 'world' or 'node'")
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"plan={plan!r}: pass an elixir.Plan or 'auto'")
        if example_batch is None:
            return _wrap_on_first_forward(model, optimizer, compute_dtype, device, process_group, group, loss_fn,
                                          hardware, disk, nonfinite, shard_over)
        plan = _searched_plan(model, example_batch, compute_dtype, group, loss_fn, hardware, shard_over)
    elif shard_over != "auto":
        raise ValueError(
            f"shard_over={shard_over!r} chooses the layout of a searched plan (plan='auto'); this plan carries its "
            "own (ChunkPlan.shard_over): make it with the layout you want, or leave shard_over out"
        )
    elif not isinstance(plan, Plan):
        raise ValueError(f"plan must be an elixir.Plan or 'auto', not {type(plan).__name__}")
    elif compute_dtype is not None and _dtype(compute_dtype) != plan.dtype:
        raise ValueError(
            f"compute_dtype={compute_dtype} but the plan computes in {plan.compute_dtype}; "
            "make the plan with the dtype you want, or leave compute_dtype out"
        )
    layout = _validate(model, optimizer, plan, device, group, process_group, disk)
    runtime = _build_runtime(layout, plan, device, group)
    return model, _install(model, optimizer, plan, layout, runtime, nonfinite, _into)


@dataclass
class _Layout:
    """What `wrap` checked and decided before allocating anything: the chunks (described, not yet
    materialized), their groups and the disk tier's folder."""

    params: dict
    chunks: list[Chunk]
    node_layout: object
    """The nodes ([Note: hierarchical sharding]): the plan's when chunks shard over nodes, else torchrun's
    environment's when it says one, else None."""
    node_of: dict | None
    """id(group) -> the group of its ranks inside this node, when chunks shard over nodes."""
    on_meta: bool
    overlap: bool
    disk_chunks: list[Chunk]
    disk_folder: str | None = None
    state_tensors: int = 0
    log_dtype: torch.dtype | None = None


def _validate(model, optimizer, plan: Plan, device: torch.device, group: ChunkGroup, process_group,
              disk: str | None) -> _Layout:
    """Every check of `wrap` (see its docstring), and the chunks described; allocates nothing."""
    plan.check_model(model, group.size)
    if plan.checkpoint_every:
        apply_checkpointing(model, plan.checkpoint_every)
    check_optimizer(optimizer, model)
    accel.check_dtype(device, plan.dtype)

    params = dict(named_parameters(model))
    group_of = optimizer_group_of(model, optimizer)
    # [Note: parallel patterns] (elixir/parallel): the group each parameter is sharded and reduced over
    chunk_group_of = parallel.chunk_groups(model, group)
    chunk_specs = _split_by_group(plan, params, group_of, chunk_group_of)
    # [Note: hierarchical sharding] (elixir/parallel/nodes.py): nodes from torchrun's environment
    node_layout = node_of = None
    if any(cp.shard_over == "node" for cp in plan.chunks):
        node_layout = _node_layout(plan, process_group, group)
        node_of = nodes.node_groups(group, node_layout, {id(g): g for g in chunk_group_of.values()})
    elif group.size > 1:
        try:
            node_layout = nodes.node_layout_from_env(group.size, group.rank)
        except ValueError:
            node_layout = None  # said nothing usable; the plan does not need it

    # the cache against the modules
    ondemand_names = {n for spec in chunk_specs if not spec[1].resident for n in spec[0]}
    fake_chunk_of = {id(params[n]): i for i, spec in enumerate(chunk_specs) for n in spec[0] if n in ondemand_names}
    need, where = _max_chunks_per_module(model, fake_chunk_of)
    if ondemand_names and need > plan.cache_blocks:
        raise ValueError(
            f"cache_blocks={plan.cache_blocks} is too small: module {where!r} uses parameters from {need} "
            f"on-demand chunks, which must be gathered together; use cache_blocks >= {need}"
        )

    dtype = plan.dtype
    chunks: list[Chunk] = []
    for idx, (names, cp, og) in enumerate(chunk_specs):
        numels = [params[n].numel() for n in names]
        offsets, used = pack_offsets(numels, dtype.itemsize)
        slots = [ParamSlot(n, params[n], off, params[n].shape, from_meta=params[n].device.type == "meta")
                 for n, off in zip(names, offsets)]
        cgroup = chunk_group_of[id(params[names[0]])]
        if cp.shard_over == "node":
            cgroup = node_of[id(cgroup)]
        chunks.append(Chunk(
            index=idx, slots=slots, numel=padded_numel(used, cgroup.size), dtype=dtype, group=cgroup,
            resident=cp.resident, param_home=cp.param_home, optim_home=cp.optim_home,
            trainable=og is not None, optim_group=og,
        ))
    # A model built on the meta device gets chunks without values; elixir.load_pretrained fills them
    # (see checkpoint/weights.py), and forward is refused until it has.
    on_meta = any(p.device.type == "meta" for p in params.values())
    layout = _Layout(params, chunks, node_layout, node_of, on_meta=on_meta,
                     overlap=plan.overlap and _overlap_supported(optimizer),
                     disk_chunks=[c for c in chunks if c.trainable and c.optim_home == "disk"])
    if layout.disk_chunks:  # [Note: the disk tier] (elixir/memory/disk.py)
        layout.disk_folder = disk if disk is not None else plan.disk_path
        layout.state_tensors = disk_state_tensors(type(optimizer), optimizer.param_groups)
        layout.log_dtype = dtype if layout.overlap and plan.grad_accum == 1 else None
        log_bytes = layout.log_dtype.itemsize if layout.log_dtype else 0
        check_scratch_folder(layout.disk_folder, sum(region_bytes(c.shard_numel, layout.state_tensors, log_bytes)
                                                     for c in layout.disk_chunks))
    return layout


def _build_runtime(layout: _Layout, plan: Plan, device: torch.device, group: ChunkGroup) -> Runtime:
    """Allocate the chunks' memory in their tiers, the cache and the disk tier's file; the runtime over them."""
    chunks, dtype = layout.chunks, plan.dtype
    keep_freed_host_memory()  # [Note: freed host memory is kept] (elixir/memory/host.py)
    tracker = MemoryTracker(device)
    if device.type == "cpu" and group.size > 1:
        # [Note: shared memory between ranks] (elixir/shm.py), inside a node and never across
        if layout.node_of is not None and layout.node_layout.nodes > 1:
            node_group = layout.node_of[id(group)]
            tracker.shared = SharedArena.create(node_group) if node_group.size > 1 else None
        else:  # the node from torchrun's environment, when it says one
            node = layout.node_layout.node_rank if layout.node_layout and layout.node_of is None else None
            tracker.shared = SharedArena.create(group, node=node)
    store = None
    if layout.disk_chunks:
        rank, world = comm.rank_and_world()
        store = DiskStore(layout.disk_folder, layout.disk_chunks, tracker, rank=rank, world=world,
                          state_tensors=layout.state_tensors, log_dtype=layout.log_dtype, pin=device.type == "cuda")
    if layout.on_meta:
        _off_meta(layout.params.values(), device, dtype)
    for chunk in chunks:
        _materialize(chunk, tracker, store)

    cache = None
    ondemand_chunks = [c for c in chunks if not c.resident]
    if ondemand_chunks:
        # no more blocks than on-demand chunks, none larger than the largest of them
        cache = BlockCache(
            min(plan.cache_blocks, len(ondemand_chunks)), max(c.numel for c in ondemand_chunks), dtype, tracker
        )
    runtime = Runtime(chunks, cache, tracker, device, prefetch_depth=plan.prefetch_depth, world=group, disk=store)
    if plan.use_order and cache is not None:
        # the profiled order drives eviction and prefetch from the first step: the order the cost model
        # replays (see [Note: one policy for the runtime and the cost model] in elixir/memory/schedule.py)
        ondemand_of = {s.name: c.index for c in ondemand_chunks for s in c.slots}
        runtime.schedule.set_order(use_order(plan.use_order, ondemand_of))
    return runtime


def _install(model, optimizer, plan: Plan, layout: _Layout, runtime: Runtime, nonfinite: str,
             into: ElixirOptimizer | None) -> ElixirOptimizer:
    """Move the buffers, install the hooks and the optimizer, and mark the model wrapped."""
    device, chunks = runtime.device, layout.chunks
    meta_buffers = set()
    for mod_name, mod in model.named_modules():
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            if b.device.type == "meta":  # a meta tensor cannot take real `.data`: replace it
                meta_buffers.add(f"{mod_name}.{name}" if mod_name else name)
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
            else:
                b.data = b.data.to(device)
    # Parameters that are not optimized keep their own dtype-less role: they are in chunks too.
    chunk_of = {id(s.param): c for c in chunks for s in c.slots}
    ondemand = {pid: c for pid, c in chunk_of.items() if not c.resident}
    _install_grad_hooks(runtime, chunks)
    interceptor = Interceptor(runtime, model, ondemand) if ondemand else None
    optim_kwargs = dict(overlap=layout.overlap, grad_accum=plan.grad_accum, nonfinite=nonfinite)
    if into is not None:
        elixir_optim = into
        elixir_optim.attach(optimizer, chunks, runtime, **optim_kwargs)
    else:
        elixir_optim = ElixirOptimizer(optimizer, chunks, runtime, **optim_kwargs)
    runtime.grads.speculation = elixir_optim.speculation
    model.register_forward_pre_hook(_before_forward(runtime, elixir_optim.speculation), prepend=True)
    if plan.predicted.get("batch_tokens"):
        model.register_forward_pre_hook(_larger_than_planned(int(plan.predicted["batch_tokens"])), with_kwargs=True)
    # staging buffers for host chunks' gradients: what their updates during backward read (chunks with a
    # rollback log), and on CUDA what later micro-batches' gradients cross to the host through
    spec = elixir_optim.speculation
    staged = [c.shard_numel for c in chunks if spec is not None and c.index in spec.logs]
    if _stages_accumulation(device) and plan.grad_accum > 1:
        staged = [c.shard_numel for c in chunks if c.trainable and c.optim_home == "host"]
    if staged:
        runtime.grads.make_staging(STAGING_BUFFERS, max(staged))
    wrap_state = _WrapState(plan, runtime, interceptor, elixir_optim, needs_weights=layout.on_meta,
                            meta_buffers=meta_buffers)
    setattr(model, _STATE_ATTR, wrap_state)
    if layout.on_meta:
        model.register_forward_pre_hook(_refuse_forward_without_weights, with_kwargs=True)
    if ondemand:
        model._register_state_dict_hook(_full_values_in_state_dict)
        model._register_load_state_dict_pre_hook(_refuse_load_state_dict, with_module=True)
    return elixir_optim


def _before_forward(runtime, speculation):
    """The root's first forward pre-hook: a backward that raised is finished first, and this step's updates
    inside backward, not yet confirmed by `step`, go back (see [Note: the step inside backward])."""

    def hook(module, args):
        if torch._C._current_graph_task_id() == -1:  # not a recomputation inside backward
            runtime.settle_backward()
            if speculation is not None:
                speculation.before_forward()

    return hook


def _larger_than_planned(planned: int):
    """A forward pre-hook: warn once when a batch is larger than the one the plan was made for, whose
    activations (and so device memory) the plan counted on."""
    from elixir.search.api import batch_tokens

    warned = False

    def hook(module, args, kwargs):
        nonlocal warned
        if warned or not torch.is_grad_enabled():
            return
        tokens = batch_tokens(dict(kwargs) if kwargs else args)
        if tokens > planned:
            warned = True
            warnings.warn(
                f"this batch has {tokens:,} tokens (elements of its first input), the plan was made for "
                f"{planned:,}: its activations need more device memory than the plan counted on; plan for the "
                "largest batch you train on (elixir.plan with that batch, or tokens_per_step)", stacklevel=2,
            )

    return hook


def _overlap_supported(optimizer) -> bool:
    """Whether `optimizer`'s updates can run inside backward (they must be undoable: see
    elixir/optim/undo.py); a plan asking for it with another optimizer runs the update after backward."""
    if Speculation.supported(type(optimizer), optimizer.param_groups):
        return True
    warnings.warn(
        f"{type(optimizer).__name__} updates cannot be undone, so they run after backward (the plan's overlap "
        "is not used); Adam, AdamW and SGD (without amsgrad) run inside backward", stacklevel=3,
    )
    return False


def _full_values_in_state_dict(model, state_dict, prefix, local_metadata):
    """`model.state_dict()` would hand out parameters that hold no memory between uses (touching
    them crashes); give the full fp32 values instead, as `full_state_dict` gathers them."""
    full = full_state_dict(model)
    first_name = {id(p): n for n, p in model.named_parameters()}  # tied parameters: one value
    for name, p in model.named_parameters(remove_duplicate=False):
        key = prefix + name
        if key in state_dict:
            state_dict[key] = full[first_name[id(p)]]
    return state_dict


def _refuse_load_state_dict(model, state_dict, prefix, *args):
    raise ValueError(
        "load_state_dict on a model wrapped with on-demand chunks would write into parameters that hold no "
        "memory; load the weights before elixir.wrap(), or use a plan with every chunk resident"
    )


def _searched_plan(model, batch, compute_dtype, group: ChunkGroup, loss_fn, hardware, shard_over: str = "auto") -> Plan:
    """elixir.plan for this model and batch; on several ranks, rank 0's result for every rank (the
    measured hardware, and so the search, may differ a little between ranks)."""
    from elixir.hardware import Hardware
    from elixir.search.api import plan as make_plan

    try:  # several nodes (torchrun's environment): the search also weighs sharding inside them
        layout = nodes.node_layout_from_env(group.size, group.rank) if group.size > 1 else None
    except ValueError:
        layout = None

    def search() -> Plan:
        return make_plan(
            model, batch, world_size=group.size, compute_dtype=compute_dtype or torch.float32, loss_fn=loss_fn,
            hardware=hardware, nodes=layout.nodes if layout else 1,
            shard_over=None if shard_over == "auto" else shard_over,
        )

    if group.size == 1:
        return search()
    if hardware is None:
        hardware = Hardware.measure()  # a collective calibration: every rank takes part
    # rank 0 searches and tells the others the plan, or why there is none (nobody waits forever)
    box = None
    if group.rank == 0:
        try:
            box = ("plan", search().to_json())
        except ValueError as e:
            box = ("error", type(e), str(e))
            failure = e
    box = comm.broadcast_object(box, 0, group, what="broadcast of rank 0's plan (elixir.wrap, plan='auto')")
    if box[0] == "error":
        if group.rank == 0:
            raise failure
        raise box[1](f"rank 0 found no plan: {box[2]}")
    return Plan.from_json(box[1])


# [Note: planning on the first forward]
# `wrap(model, optim)` with plan="auto" and no example batch cannot profile yet: it checks what it
# can, returns the model and a pending ElixirOptimizer (its param groups hold the hyper-parameters,
# so lr schedulers can be made on it at once), and installs a forward pre-hook. The first forward
# hands its batch to the planner, builds the chunks under the searched plan, runs the root pre-hook
# that the call in flight has already passed, and goes on. Anything that needs the chunks before a
# forward (runtime_of, save, load, load_pretrained, export: collective calls that every rank makes)
# builds them under the default plan instead, every chunk resident.


class _Pending:
    def __init__(self, optimizer, kwargs: dict, batch_kwargs: dict, handle=None) -> None:
        self.optimizer = optimizer
        self.kwargs = kwargs  # for wrap()
        self.batch_kwargs = batch_kwargs  # for the planner
        self.handle = handle


def _wrap_on_first_forward(model, optimizer, compute_dtype, device, process_group, group, loss_fn, hardware,
                           disk=None, nonfinite="error", shard_over="auto"):
    check_optimizer(optimizer, model)
    if compute_dtype is not None:
        accel.check_dtype(device, _dtype(compute_dtype))
    pending = ElixirOptimizer.pending(optimizer)
    state = _Pending(
        optimizer,
        dict(compute_dtype=compute_dtype, device=device, process_group=process_group, disk=disk, nonfinite=nonfinite,
             _into=pending),
        dict(compute_dtype=compute_dtype, group=group, loss_fn=loss_fn, hardware=hardware, shard_over=shard_over),
    )
    state.handle = model.register_forward_pre_hook(_plan_on_first_forward, prepend=True, with_kwargs=True)
    setattr(model, _LAZY_ATTR, state)
    return model, pending


def _finish_pending(model, batch) -> None:
    """Build the chunks of a model wrapped with plan="auto" and no batch (see [Note: planning on
    the first forward]): under the plan searched for `batch`, or the default plan when None."""
    state: _Pending = model.__dict__.pop(_LAZY_ATTR)
    state.handle.remove()
    bk = state.batch_kwargs
    if batch is not None:
        plan = _searched_plan(model, batch, bk["compute_dtype"], bk["group"], bk["loss_fn"], bk["hardware"],
                              bk["shard_over"])
    else:
        dtype = bk["compute_dtype"] and _dtype(bk["compute_dtype"])
        plan = _default_plan(model, state.optimizer, dtype, bk["group"].size)
    wrap(model, state.optimizer, plan=plan, **state.kwargs)


def _plan_on_first_forward(model, args, kwargs):
    if kwargs and not args:
        batch = dict(kwargs)
    elif len(args) == 1 and not kwargs and torch.is_tensor(args[0]):
        batch = args[0]
    else:
        raise ValueError(
            "plan='auto' profiles the first forward call, which must be model(**batch) or model(tensor); "
            "pass example_batch= to elixir.wrap, or a Plan"
        )
    _finish_pending(model, batch)
    state = getattr(model, _STATE_ATTR)
    if state.needs_weights:
        _refuse_forward_without_weights(model, args, kwargs)
    if state.interceptor is not None:
        state.interceptor.root_pre(model, args)


def state_of(model: torch.nn.Module):
    """The wrap state of a wrapped model (its chunks built, see [Note: planning on the first forward])."""
    if hasattr(model, _LAZY_ATTR):
        _finish_pending(model, None)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not wrapped; call elixir.wrap(model, optimizer) first")
    return state


def _refuse_forward_without_weights(model, args, kwargs):
    if getattr(model, _STATE_ATTR).needs_weights:
        raise ValueError(
            "this model was built on the meta device and has no weights yet; "
            "call elixir.load_pretrained(model, path) first"
        )


class _WrapState:
    """What `wrap` made for a model (`state_of` returns it): its plan, runtime, interceptor and optimizer."""

    def __init__(self, plan, runtime, interceptor, optimizer, *, needs_weights: bool = False,
                 meta_buffers: set[str] = frozenset()) -> None:
        self.plan = plan
        self.runtime = runtime
        self.interceptor = interceptor
        self.optimizer = optimizer
        self.needs_weights = needs_weights
        """Built on the meta device: forwards are refused until `load_pretrained` or `load` gives it weights."""
        self.meta_buffers = set(meta_buffers)  # buffers built on the meta device: zeros until the weights come

    def buffers_without_values(self, loaded) -> set[str]:
        """The buffers built on the meta device that `loaded` (names of the buffers the weights filled)
        leaves as the zeros `wrap` put there."""
        return self.meta_buffers - set(loaded)

    def weights_loaded(self) -> None:
        """The model has its weights (and its meta buffers their values): forwards may run."""
        self.needs_weights, self.meta_buffers = False, set()


def runtime_of(model: torch.nn.Module) -> Runtime:
    """The `Runtime` of a model that `elixir.wrap` wrapped: its chunks, block cache and eviction schedule
    (`elixir.memory_stats` reads its counters). ValueError for a model that is not wrapped."""
    return state_of(model).runtime


def plan_of(model: torch.nn.Module):
    """The plan a wrapped model runs under: the one given to `wrap`, or the one the planner chose (at the
    first forward, or at wrap time with `example_batch`). A model whose plan is still to be made gets the
    default plan now, as anything that needs its chunks does."""
    return state_of(model).plan


def memory_stats(model: torch.nn.Module) -> dict:
    """Model data as Elixir counts it: bytes per tier now and at peak, chunk fetches so far and the seconds
    uses waited for them (`fetch_wait_s`, host clock). Before
    the first forward of a model that plans on it, nothing is allocated yet: every counter is 0."""
    if hasattr(model, _LAZY_ATTR):
        return dict.fromkeys(Runtime.STAT_KEYS, 0) | {"left_profiled_order": False}
    return runtime_of(model).stats()


def _stages_accumulation(device: torch.device) -> bool:
    """Whether later micro-batches' gradients of host chunks cross to the host through staging buffers: on a
    GPU (on a CPU they are added where they are)."""
    return device.type == "cuda"


def step_stats(model: torch.nn.Module) -> dict:
    """What the optimizer did so far: steps (skipped ones included), steps skipped on fp16 overflow, whether
    updates run inside backward, how many steps did, and the rollbacks of those (with their reasons: clip,
    overflow, accumulation, zero_grad), late gradients and steps whose clip paused the updates inside backward;
    see elixir/optim/overlap.py. Cumulative seconds: `update_s` the updates inside backward took where they ran
    (on the host's clock; for device chunks on a GPU, launching them), `update_wait_s` the worker's waits for a
    gradient's copy to the host, `staging_wait_s` backward's waits for a free staging buffer; the worker's updates
    by part: `update_log_s` (the gradient into its rollback log), `update_check_s` (the finite check, and the norm
    where a clip reads it), `update_step_s` (the optimizer's own step), `update_shard_s` (the updated master into
    the parameter shard); `accumulate_s`, the worker's adds of later micro-batches' gradients into host chunks'
    gradients on a GPU."""
    if hasattr(model, _LAZY_ATTR):
        return {"steps": 0, "skipped_steps": 0, "nonfinite_steps": 0, "overlap": False, "speculated_steps": 0,
                "rollbacks": 0, "rollback_reasons": {}, "late_gradients": 0, "clip_pauses": 0, "update_s": 0.0,
                "update_wait_s": 0.0, "staging_wait_s": 0.0, **dict.fromkeys(UPDATE_PARTS, 0.0)}
    return state_of(model).optimizer.step_stats()


def _dtype(d) -> torch.dtype:
    from elixir.plan import DTYPES, dtype_name

    return DTYPES[dtype_name(d)]


def _split_by_group(plan: Plan, params: dict, group_of: dict, chunk_group_of: dict | None = None) -> list:
    """Plan chunks split where they mix optimizer groups or chunk groups (chunks never mix them)."""
    out = []
    for cp in plan.chunks:
        run: list[str] = []
        run_group, run_key = object(), object()
        for n in cp.params:
            g = group_of.get(id(params[n]))
            key = (g, chunk_group_of.get(id(params[n])) if chunk_group_of else None)
            if run and key != run_key:
                out.append((run, cp, run_group))
                run = []
            run.append(n)
            run_group, run_key = g, key
        out.append((run, cp, run_group))
    return out


def _max_chunks_per_module(model, chunk_of: dict[int, int]) -> tuple[int, str]:
    best, where = 0, ""
    for name, module in model.named_modules():
        n = len({chunk_of[id(p)] for p in module.parameters(recurse=False) if id(p) in chunk_of})
        if n > best:
            best, where = n, name or "<root>"
    return best, where


def _materialize(chunk: Chunk, tracker: MemoryTracker, disk: DiskStore | None = None) -> None:
    """Allocate the chunk's buffers and move the parameters' values in; the original parameter
    memory is released as each `.data` is replaced. A disk chunk's master goes to its region of the
    scratch file at once."""
    dtype, rng = chunk.dtype, chunk.shard_slice
    # fp32 values of this rank's slice, from the original parameters (masters keep full precision)
    values = torch.zeros(chunk.shard_numel, dtype=torch.float32)
    for s in chunk.slots:
        lo, hi = max(s.offset, rng.start), min(s.offset + s.numel, rng.stop)
        if lo < hi and not s.from_meta:
            flat = s.param.detach().reshape(-1)[lo - s.offset : hi - s.offset]
            values[lo - rng.start : hi - rng.start].copy_(flat)
    # [Note: host bytes per parameter]
    # An on-demand chunk whose fp32 master lives where its parameter shard would live stores no shard in
    # the compute dtype: every fetch casts it from the master (fp32 compute: the shard *is* the master).
    # A host-optimizer chunk so holds its master and the optimizer states, and nothing else between
    # steps; gradients cross through staging buffers (see [Note: the step inside backward] in
    # elixir/optim/overlap.py for what stays during backward).
    derived = not chunk.resident and chunk.trainable and chunk.param_home == chunk.optim_home
    if chunk.resident:
        full = tracker.empty(chunk.numel, dtype, "device", zero=True, share=True)
        for s in chunk.slots:
            if not s.from_meta:
                full[s.offset : s.offset + s.numel].copy_(s.param.detach().reshape(-1))
        chunk.shard = full[rng]
        chunk.bind(full)
    else:
        if not derived:
            chunk.shard = tracker.empty(chunk.shard_numel, dtype, chunk.param_home, pin=True)  # copied in and out
            chunk.shard.copy_(values)
        device = tracker.devices["device"]
        for s in chunk.slots:
            s.placeholder = empty_like_shape(s.shape, dtype, device)
            s.param.data = s.placeholder
    if chunk.trainable and chunk.optim_home == "disk":
        buf = disk.take_buffer()
        master, _, _ = disk.sections(chunk, buf)
        master.copy_(values)
        disk.write(chunk, buf).result()
        chunk.master = disk.parked(chunk.shard_numel, torch.float32)
    elif chunk.trainable:
        if dtype == torch.float32 and chunk.param_home == chunk.optim_home:
            if chunk.shard is None:  # fp32 compute: the parameter shard is the master
                chunk.shard = tracker.empty(chunk.shard_numel, dtype, chunk.param_home, pin=True)
                chunk.shard.copy_(values)
            chunk.master = chunk.shard
        else:
            # pinned when it is copied to the device every step (see accel.py); a no-op on the CPU
            to_device = chunk.optim_home == "host" and (chunk.param_home == "device" or derived)
            chunk.master = tracker.empty(chunk.shard_numel, torch.float32, chunk.optim_home, pin=to_device)
            chunk.master.copy_(values)


def _off_meta(params, device: torch.device, dtype: torch.dtype) -> None:
    """Give meta parameters a real (empty) tensor in place, keeping the same Parameter objects (the
    optimizer and tied modules hold them); a meta tensor's `.data` cannot be set to a real one."""
    for p in params:
        if p.device.type == "meta":
            empty = torch.nn.Parameter(empty_like_shape(p.shape, dtype, device), requires_grad=p.requires_grad)
            torch.utils.swap_tensors(p, empty)
            p.__dict__.update(empty.__dict__)  # swap_tensors swaps Python attributes too: keep p's


def _install_grad_hooks(runtime: Runtime, chunks: list[Chunk]) -> None:
    for c in chunks:
        for i, s in enumerate(c.slots):
            if not s.param.requires_grad:
                continue
            c.trainable_slots += 1
            s.param.register_post_accumulate_grad_hook(_grad_hook(runtime, c, i))


def _grad_hook(runtime: Runtime, chunk: Chunk, slot: int):
    # Weak references: torch keeps a parameter's post-accumulate-grad hooks from C++, where the garbage
    # collector cannot see them, so a hook holding the runtime (which holds the parameter) would keep the
    # model's chunks, masters and states alive after the model is gone.
    runtime_ref, chunk_ref = weakref.ref(runtime), weakref.ref(chunk)

    def hook(p: torch.Tensor) -> None:
        runtime, chunk = runtime_ref(), chunk_ref()
        g, p.grad = p.grad, None
        if runtime is None or chunk is None:
            return
        runtime.enter_backward()
        if chunk.trainable:
            runtime.grads.add(chunk, slot, g)

    return hook


@torch.no_grad()
def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value as fp32 host tensors, by name (the masters for trained ones),
    gathered one chunk at a time. On several ranks every rank must call it."""
    state = state_of(model)
    rt = state.runtime
    out: dict[str, torch.Tensor] = {}
    for c in rt.chunks:
        full = torch.empty(c.numel, dtype=torch.float32, device=rt.device)
        with state.optimizer.loaded(c):
            src = c.master if c.master is not None else c.shard
            comm.all_gather(full, src.to(device=rt.device, dtype=torch.float32), c.group)
        full = full.cpu()
        for s in c.slots:
            out[s.name] = full[s.offset : s.offset + s.numel].view(s.shape).clone()
    return parallel.gather_full_values(model, out)  # expert-parallel parameters: every expert
