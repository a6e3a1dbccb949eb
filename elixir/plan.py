"""Plans: where every chunk of model data lives, decided before training.

A `Plan` lists the chunks (the parameter names each packs, in order) and, per chunk, whether it
stays gathered for the whole step (`resident`) or is gathered on demand into the block cache, where
this rank's parameter shard lives between uses (`param_home`) and where the fp32 master and the
optimizer states live and update (`optim_home`). Plans are frozen, round-trip through JSON, and are
checked against the model they are applied to.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch

from elixir import comm
from elixir.memory.chunk import pack_offsets, padded_numel, shape_numel
from elixir.memory.tracker import TIERS

HOMES = TIERS
"""Memory tiers: where a chunk's parameter shard, or its master and optimizer states, live (the tiers whose
bytes `MemoryTracker` counts)."""
SHARD_OVER = ("world", "node")
"""What a chunk is sharded over (see [Note: hierarchical sharding] in elixir/parallel/nodes.py)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Compute dtypes by canonical name."""
DTYPE_FLAGS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The same dtypes by the short names the command line takes."""
_DTYPE_ALIASES = {**{flag: name for flag, d in DTYPE_FLAGS.items() for name, e in DTYPES.items() if d == e},
                  "half": "float16"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name of a compute dtype; ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
    elif isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype, dtype.removeprefix("torch."))
        if name in DTYPES:
            return name
    raise ValueError(
        f"compute_dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)} (or fp32, bf16, fp16)"
    )


def _check_home(what: str, home: str) -> None:
    if home not in HOMES:
        raise ValueError(f"{what}={home!r} is not a memory tier; use 'device', 'host' or 'disk'")
    if what == "param_home" and home == "disk":
        raise ValueError(
            "param_home='disk': parameter shards live on the device or the host (a fetch reads them twice a "
            "step); masters and optimizer states go to disk with optim_home='disk'"
        )


@dataclass(frozen=True, kw_only=True)
class ChunkPlan:
    """One chunk and where it lives."""

    params: tuple[str, ...]
    """Names of the parameters it packs, in order (tied parameters appear once, by first name)."""
    resident: bool
    """Kept gathered on the device for the whole step (ZeRO-2 for this chunk), else fetched on demand."""
    param_home: str = "device"
    """Where this rank's parameter shard lives between uses: 'device' or 'host'."""
    optim_home: str = "device"
    """Where the fp32 master, gradient shard and optimizer states live and update: 'device', 'host', or
    'disk' (a scratch file, streamed through host buffers when the chunk updates; see elixir/memory/disk.py)."""
    shard_over: str = "world"
    """What the chunk is sharded over: 'world' (every rank of the run) or 'node' (the ranks of each node,
    replicated across nodes: gathers stay inside a node, gradients cross nodes once, as an all-reduce of the
    shard; see [Note: hierarchical sharding] in elixir/parallel/nodes.py)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        if not self.params:
            raise ValueError("a chunk must hold at least one parameter")
        if self.shard_over not in SHARD_OVER:
            raise ValueError(
                f"chunk starting with {self.params[0]!r}: shard_over={self.shard_over!r}; use 'world' (sharded over "
                "every rank) or 'node' (sharded over the ranks of each node, replicated across nodes)"
            )
        _check_home("param_home", self.param_home)
        _check_home("optim_home", self.optim_home)
        if self.resident and self.param_home != "device":
            raise ValueError(
                f"chunk starting with {self.params[0]!r}: resident=True keeps the whole chunk on the device, "
                f"so param_home={self.param_home!r} has no meaning; use resident=False to keep its shard on host"
            )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Where all model data lives, for one model, world size and compute dtype."""

    chunks: tuple[ChunkPlan, ...]
    """The chunks in packing order."""
    chunk_numel: int
    """Capacity of a chunk, and of a cache block, in elements of the compute dtype."""
    cache_blocks: int
    """Number of device blocks that on-demand chunks are gathered into."""
    prefetch_depth: int = 2
    """How many upcoming on-demand chunks to fetch ahead of their use."""
    compute_dtype: str = "float32"
    """Dtype of parameters in chunks and of compute: float32, bfloat16 or float16."""
    world_size: int = 1
    """Number of ranks the chunks are sharded over."""
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Every parameter name of the model the plan was made for, with its shape."""
    use_order: tuple[str, ...] = ()
    """Parameter names in the order a profiled step uses them (empty: the runtime records the first step)."""
    predicted: dict = field(default_factory=dict, compare=False)
    """The cost model's prediction for this plan (step time, peak bytes per tier), when searched."""
    group_sizes: dict[str, int] = field(default_factory=dict)
    """Parameters sharded over fewer ranks than `world_size`, with that number (expert parallel: the ranks
    that hold the same experts; see elixir/parallel); every other parameter is sharded over `world_size`."""
    overlap: bool = True
    """Run each chunk's optimizer update during backward, as soon as its gradient is complete, instead of
    after backward (speculative: see [Note: the step inside backward] in elixir/optim/overlap.py)."""
    grad_accum: int = 1
    """Micro-batches (backward passes) per optimizer step the plan is made for. With more than one, the
    fp32 gradients of host-optimizer chunks are held from one micro-batch to the next."""
    micro_batch_size: int = 0
    """Sequences per micro-batch on each rank the plan was searched for (0: not chosen by the planner)."""
    checkpoint_every: int = 0
    """Activation checkpointing of every k-th transformer block the plan was searched for (0: none)."""
    disk_path: str = ""
    """Scratch folder of chunks with optim_home='disk' (each rank's file goes there); `elixir.wrap(disk=...)`
    overrides it, since a folder belongs to a machine rather than to a plan."""
    nodes: int = 1
    """The nodes the `world_size` ranks run on (as many ranks on each); chunks with shard_over='node' are
    sharded over world_size / nodes ranks. `elixir.wrap` checks it against torchrun's environment."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", tuple(self.chunks))
        object.__setattr__(self, "compute_dtype", dtype_name(self.compute_dtype))
        object.__setattr__(self, "param_shapes", {k: tuple(v) for k, v in self.param_shapes.items()})
        object.__setattr__(self, "use_order", tuple(self.use_order))
        object.__setattr__(self, "group_sizes", {k: int(v) for k, v in self.group_sizes.items()})
        for name, ranks in self.group_sizes.items():
            if ranks < 1 or self.world_size % ranks:
                raise ValueError(
                    f"group_sizes[{name!r}]={ranks} must divide world_size={self.world_size}: "
                    "a chunk group is part of the run"
                )
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be at least 1")
        if not isinstance(self.nodes, int) or isinstance(self.nodes, bool) or self.nodes < 1 \
                or self.world_size % self.nodes:
            raise ValueError(
                f"nodes={self.nodes!r} must be a positive int that divides world_size={self.world_size}: every node "
                "runs the same number of ranks"
            )
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap={self.overlap!r} must be True or False")
        for name in ("grad_accum", "micro_batch_size", "checkpoint_every"):
            value = getattr(self, name)
            least = 1 if name == "grad_accum" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name}={value!r} must be an int of at least {least}")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth={self.prefetch_depth} must be 0 or more")
        if self.cache_blocks < 0:
            raise ValueError(f"cache_blocks={self.cache_blocks} must be 0 or more")
        if self.chunk_numel < 1:
            raise ValueError(f"chunk_numel={self.chunk_numel} must be positive")
        if any(not c.resident for c in self.chunks) and self.cache_blocks < 1:
            raise ValueError(
                f"cache_blocks={self.cache_blocks}: chunks fetched on demand need a cache of at least one "
                "block; raise cache_blocks or make every chunk resident"
            )
        seen: set[str] = set()
        for c in self.chunks:
            if len({self.group_sizes.get(n, self.world_size) for n in c.params}) > 1:
                raise ValueError(
                    f"chunk starting with {c.params[0]!r} mixes parameters sharded over different groups "
                    "(group_sizes); chunks never mix groups: split it"
                )
            ranks = self.group_sizes.get(c.params[0], self.world_size)
            if c.shard_over == "node" and ranks % self.nodes:
                raise ValueError(
                    f"chunk starting with {c.params[0]!r} is sharded over {ranks} ranks (group_sizes), which do not "
                    f"spread evenly over {self.nodes} nodes, so shard_over='node' cannot shard it inside each node; "
                    "use shard_over='world' for it, or an expert-parallel size that divides the ranks per node"
                )
            for name in c.params:
                if name in seen:
                    raise ValueError(f"parameter {name!r} is in two chunks; each parameter is in exactly one")
                seen.add(name)
                if self.param_shapes and name not in self.param_shapes:
                    raise ValueError(f"chunk parameter {name!r} is not among the plan's param_shapes")
            numel = self.chunk_used_numel(c)
            if numel > self.chunk_numel:
                raise ValueError(
                    f"chunk starting with {c.params[0]!r} needs {numel} elements but chunk_numel is "
                    f"{self.chunk_numel}; raise chunk_numel (chunk_mib) or split the chunk"
                )

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    @property
    def block_numel(self) -> int:
        return padded_numel(self.chunk_numel, self.world_size)

    def chunk_ranks(self, chunk: ChunkPlan) -> int:
        """How many ranks the chunk is sharded over (its group's size; inside a node for shard_over='node')."""
        ranks = self.group_sizes.get(chunk.params[0], self.world_size)
        return ranks // self.nodes if chunk.shard_over == "node" else ranks

    def cache_layout(self) -> tuple[int, int]:
        """(blocks, elements per block) the cache really needs: no more blocks than on-demand chunks,
        blocks no larger than the largest of them (padded to the world size)."""
        ondemand = [padded_numel(self.chunk_used_numel(c), self.chunk_ranks(c)) for c in self.chunks if not c.resident]
        if not ondemand:
            return 0, 0
        return min(self.cache_blocks, len(ondemand)), max(ondemand) if self.param_shapes else self.block_numel

    def chunk_used_numel(self, chunk: ChunkPlan) -> int:
        if not self.param_shapes:
            return 0
        numels = [shape_numel(self.param_shapes[n]) for n in chunk.params]
        return pack_offsets(numels, self.dtype.itemsize)[1]

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def uniform(
        cls,
        model: torch.nn.Module,
        *,
        chunk_mib: float = 32.0,
        cache_blocks: int = 4,
        resident: bool = True,
        param_home: str = "device",
        optim_home: str = "device",
        compute_dtype: torch.dtype | str = torch.float32,
        prefetch_depth: int = 2,
        world_size: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        overlap: bool = True,
        grad_accum: int = 1,
        disk_path: str = "",
        shard_over: str = "world",
        nodes: int | None = None,
    ) -> Plan:
        """The same choices for every chunk. Chunks never mix optimizer groups or frozen parameters;
        pass `optimizer` to chunk by its groups (wrap() splits chunks that mix them anyway).
        `overlap`, `grad_accum`, `disk_path`, `shard_over`, `nodes`: see the fields of the same names;
        `nodes` defaults to torchrun's environment (WORLD_SIZE / LOCAL_WORLD_SIZE), else 1."""
        name = dtype_name(compute_dtype)
        _check_home("param_home", param_home)
        _check_home("optim_home", optim_home)
        if world_size is None:
            world_size = comm.rank_and_world()[1]
        if chunk_mib <= 0:
            raise ValueError(f"chunk_mib={chunk_mib} must be positive")
        if shard_over not in SHARD_OVER:
            raise ValueError(
                f"shard_over={shard_over!r}: use 'world' (sharded over every rank) or 'node' (sharded over the "
                "ranks of each node, replicated across nodes)"
            )
        if nodes is None:
            nodes = comm.launched_nodes(world_size)
        itemsize = DTYPES[name].itemsize
        chunk_numel = int(chunk_mib * 2**20) // itemsize
        named = named_parameters(model)
        biggest_name, biggest = max(((n, p.numel()) for n, p in named), key=lambda x: x[1])
        if biggest > chunk_numel:
            need = biggest * itemsize / 2**20
            raise ValueError(
                f"chunk_mib={chunk_mib} ({chunk_numel} {name} elements) cannot hold parameter "
                f"{biggest_name!r} of {biggest} elements; use chunk_mib >= {need:.4g}"
            )
        groups = optimizer_group_of(model, optimizer)
        # nor parameters of different parallel patterns (elixir.parallel: expert-parallel ones pack apart)
        from elixir.parallel import group_sizes, pack_keys

        keys = pack_keys(model)
        groups = {pid: (g, keys.get(pid, 0)) for pid, g in groups.items()}
        chunks = pack_chunks(named, groups, chunk_numel, itemsize)
        return cls(
            chunks=tuple(
                ChunkPlan(params=tuple(c), resident=resident, param_home=param_home, optim_home=optim_home,
                          shard_over=shard_over)
                for c in chunks
            ),
            chunk_numel=chunk_numel,
            cache_blocks=cache_blocks,
            prefetch_depth=prefetch_depth,
            compute_dtype=name,
            world_size=world_size,
            param_shapes={n: tuple(p.shape) for n, p in named},
            group_sizes=group_sizes(model, world_size),
            overlap=overlap,
            grad_accum=grad_accum,
            disk_path=disk_path,
            nodes=nodes,
        )

    # --- checks -----------------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module, world_size: int) -> None:
        """ValueError that says what differs when the plan was made for another model or world size."""
        if world_size != self.world_size:
            raise ValueError(
                f"the plan was made for world_size={self.world_size} but this run has {world_size} ranks; "
                "make the plan again for this world size"
            )
        from elixir.parallel import group_sizes

        if group_sizes(model, world_size) != self.group_sizes:
            raise ValueError(
                "the plan was made for another expert-parallel layout: its group_sizes differ from the model's "
                "(elixir.parallel.expert_parallel with another ep_size, or none); make the plan after "
                "expert_parallel, for this model"
            )
        shapes = {n: tuple(p.shape) for n, p in named_parameters(model)}
        diffs = []
        for n in self.param_shapes.keys() - shapes.keys():
            diffs.append(f"{n!r} is in the plan but not in the model")
        for n in shapes.keys() - self.param_shapes.keys():
            diffs.append(f"{n!r} is in the model but not in the plan")
        for n in shapes.keys() & self.param_shapes.keys():
            if shapes[n] != self.param_shapes[n]:
                model_shape, plan_shape = list(shapes[n]), list(self.param_shapes[n])
                diffs.append(f"{n!r} has shape {model_shape} in the model, {plan_shape} in the plan")
        if diffs:
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise ValueError(
                "the plan was made for another model: " + "; ".join(sorted(diffs)[:5]) + more
                + ". Make the plan for this model (elixir.Plan.uniform(model, ...) or elixir.plan(model, ...))"
            )

    # --- JSON -------------------------------------------------------------------------------

    def to_json(self) -> str:
        d = asdict(self)
        d["param_shapes"] = {k: list(v) for k, v in self.param_shapes.items()}
        # the defaults of the fields of hierarchical sharding are left out: such plans read as before it
        for c in d["chunks"]:
            if c["shard_over"] == "world":
                del c["shard_over"]
        if d["nodes"] == 1:
            del d["nodes"]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "plan JSON") -> Plan:
        """The plan `to_json` wrote. Every field is checked for presence, type and range first (see [Note:
        untrusted files] in elixir/validation.py): a ValueError names `source` (the file's path, when the
        text came from one), the field and what was expected."""
        from elixir.validation import Fields, load_json

        doc = Fields(load_json(text, source, what="write it again with Plan.to_json or elixir plan --json"), source)
        doc.only(_PLAN_FIELDS)
        chunks = []
        for c in doc.objects("chunks"):
            c.only(("params", "resident", "param_home", "optim_home", "shard_over"))
            params = c.get("params", "list")
            for i, name in enumerate(params):
                c.check(name, f"{c.path('params')}[{i}]", "str")
            chunks.append(dict(params=tuple(params), resident=c.get("resident", "bool"),
                               param_home=c.get("param_home", "str", default="device", choices=HOMES),
                               optim_home=c.get("optim_home", "str", default="device", choices=HOMES),
                               shard_over=c.get("shard_over", "str", default="world", choices=SHARD_OVER)))
        shapes = doc.obj("param_shapes", default=None)
        for name, shape in (shapes.data.items() if shapes else ()):
            shapes.check(shape, shapes.path(name), "list")
            for i, d in enumerate(shape):
                shapes.check(d, f"{shapes.path(name)}[{i}]", "int", least=0)
        use_order = doc.get("use_order", "list", default=[])
        for i, name in enumerate(use_order):
            doc.check(name, f"use_order[{i}]", "str")
        groups = doc.obj("group_sizes", default=None)
        for name in (groups.data if groups else ()):
            groups.get(name, "int", least=1)
        values = dict(
            chunk_numel=doc.get("chunk_numel", "int", least=1),
            cache_blocks=doc.get("cache_blocks", "int", least=0),
            prefetch_depth=doc.get("prefetch_depth", "int", least=0, default=2),
            compute_dtype=doc.get("compute_dtype", "str", default="float32"),
            world_size=doc.get("world_size", "int", least=1, default=1),
            param_shapes=shapes.data if shapes else {},
            use_order=tuple(use_order),
            predicted=doc.get("predicted", "object", default={}),
            group_sizes=groups.data if groups else {},
            overlap=doc.get("overlap", "bool", default=True),
            grad_accum=doc.get("grad_accum", "int", least=1, default=1),
            micro_batch_size=doc.get("micro_batch_size", "int", least=0, default=0),
            checkpoint_every=doc.get("checkpoint_every", "int", least=0, default=0),
            disk_path=doc.get("disk_path", "str", default=""),
            nodes=doc.get("nodes", "int", least=1, default=1),
        )
        try:  # what no single field says: parameters in two chunks, a chunk larger than chunk_numel, ...
            plan = cls(chunks=tuple(ChunkPlan(**c) for c in chunks), **values)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        placed = {n for c in plan.chunks for n in c.params}
        for name in plan.param_shapes:  # a plan places every parameter it knows: one in no chunk was lost
            if name not in placed:
                raise ValueError(f"{source}: parameter {name!r} of param_shapes is in no chunk; the plan is damaged: "
                                 "make it again")
        return plan

    def summary(self) -> str:
        """One line per distinct placement: how many chunks and bytes live where."""
        rows: dict[tuple, list[int]] = {}
        nodes = any(c.shard_over == "node" for c in self.chunks)
        for c in self.chunks:
            key = ("resident" if c.resident else "on demand", c.param_home, c.optim_home, c.shard_over)
            r = rows.setdefault(key, [0, 0])
            r[0] += 1
            r[1] += self.chunk_used_numel(c)
        lines = [f"{'chunks':>6}  {'params':>12}  {'gathered':<10} {'param shard':<11} {'optimizer':<9}"
                 + (" sharded over" if nodes else "")]
        for (res, ph, oh, over), (n, numel) in rows.items():
            lines.append(f"{n:>6}  {numel:>12,}  {res:<10} {ph:<11} {oh:<9}" + (f" {over}" if nodes else ""))
        lines.append(
            f"chunk {self.chunk_numel:,} elements, {self.cache_blocks} cache blocks, prefetch "
            f"{self.prefetch_depth}, {self.compute_dtype}, {self.world_size} rank(s)"
            + (f" on {self.nodes} nodes" if self.nodes > 1 else "") + ", optimizer "
            + ("inside backward" if self.overlap else "after backward")
        )
        batch = []
        if self.micro_batch_size:
            batch.append(f"micro-batch {self.micro_batch_size}")
        if self.grad_accum > 1 or batch:
            batch.append(f"{self.grad_accum} micro-batch(es) per step")
        if self.checkpoint_every:
            batch.append(f"activation checkpointing every {self.checkpoint_every} block(s)")
        elif batch:
            batch.append("no activation checkpointing")
        if batch:
            lines.append(", ".join(batch))
        return "\n".join(lines)



_PLAN_FIELDS = tuple(f.name for f in fields(Plan))


def named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters by first name, tied ones once (as `model.named_parameters()` does)."""
    return list(model.named_parameters())


def optimizer_group_of(model: torch.nn.Module, optimizer) -> dict[int, int | None]:
    """id(param) -> index of its optimizer param group (None: frozen or not optimized)."""
    out: dict[int, int | None] = {}
    if optimizer is not None:
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                out[id(p)] = gi
    else:
        for _, p in named_parameters(model):
            out[id(p)] = 0
    for _, p in named_parameters(model):
        if not p.requires_grad:
            out[id(p)] = None
        out.setdefault(id(p), None)
    return out


def pack_chunks(named, group_of: dict[int, int | None], chunk_numel: int, itemsize: int) -> list[list[str]]:
    """Pack parameters in order into chunks of at most `chunk_numel` elements (aligned starts),
    one open chunk per optimizer group, never splitting a parameter."""
    chunks: list[list[str]] = []
    open_chunk: dict[int | None, tuple[int, list[int]]] = {}  # group -> (chunk index, numels)
    for name, p in named:
        g = group_of.get(id(p))
        cur = open_chunk.get(g)
        if cur is not None:
            idx, numels = cur
            if pack_offsets(numels + [p.numel()], itemsize)[1] <= chunk_numel:
                numels.append(p.numel())
                chunks[idx].append(name)
                continue
        chunks.append([name])
        open_chunk[g] = (len(chunks) - 1, [p.numel()])
    return chunks
