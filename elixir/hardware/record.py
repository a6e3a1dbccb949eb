"""The `Hardware` record: one rank's view of a machine, as the planner's cost model reads it.

The record itself (its fields, their checks, the lookups the cost model makes, copies with other memory,
disk or network, and its JSON form) and `parse_bytes`, which reads the human sizes its memory fields
accept. Presets live in elixir/hardware/presets.py, the calibration of the machine at hand in
elixir/hardware/measure.py; `Hardware.preset` and `Hardware.measure` reach them when called.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

import torch

# 2: attention_flops; AdamW on buffers beyond the last-level cache; Linear-layer GEMMs
# 3: CPU collectives as the runtime runs them (all-to-alls, shared memory between ranks of one host)
# 4: the costs of running operators (per operator, interception, per fetch, memory-bound operators)
# 5: memory-bound operators whose outputs alias their inputs (aten._unsafe_view) move no bytes
# 6: memory-bound operators' rate by the bytes one moves (`eager_rates`); `grouped_mm_flops`
# 7: every timing is the median of its runs, not the shortest (see [Note: the typical run, not the best] in
#    elixir/hardware/measure.py): a record of version 6 has every rate 10-25% too high on a noisy machine;
#    matmuls' rate by the size of one product (`matmul_by_size`)
# 8: `spare_cores`: whether the optimizer's worker thread has a core of its own on a CPU device
# 9: `optim_step_overhead_s`: the optimizer's cost per chunk update beyond its elements
# 10: `interception_op_s` timed on a wider transformer; `fetch_overhead_s` without what the cost model charges a
#     fetch on its own (the copy, a collective's fixed cost), which a record of version 9 counted twice
# 11: `host_bytes_per_s`: the host's memory-bound rate on a GPU machine; its AdamW rate timed on as many elements
#     as the device's (a record of version 10 timed an eighth of them, whose buffers could stay in the host's caches)
# 12: on a GPU machine the host's AdamW and memory-bound rates timed beyond its last-level cache (2**27 and 2**28
#     elements): a record of version 11 timed 2**24 and 2**25, which a server's cache could hold (2.4x and 3x
#     the rates the worker's updates ran at on the H200 of BENCHMARKS.md)
# 13: on a GPU machine the host's AdamW and memory-bound rates timed beside a thread launching kernels, as the
#     worker's updates run beside the compute thread (a record of version 12 timed them alone: 1.1-1.3x the rate
#     of the updates inside a step on the H200 of BENCHMARKS.md)
_FORMAT_VERSION = 13
ADAMW_BYTES_PER_ELEMENT = 28  # a fused AdamW step reads param, grad, two moments; writes three

# ---------------------------------------------------------------------------------------------------------------
# sizes


_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int) -> int:
    """Bytes in a human size: "40GiB" (2**30), "40GB" (10**9), "512MiB", "1.5TiB", "4096" (bytes).

    Accepts B, KB/KiB, MB/MiB, GB/GiB, TB/TiB in any letter case; anything else is a ValueError naming it.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size {value!r} is negative; give a number of bytes >= 0")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    unit = match.group(2).upper() if match else None
    if match is None or (unit or "B") not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as a size; write a number and a unit such as '40GiB', '80GB', '512MiB' "
            f"(units: {', '.join(u if 'I' not in u else u.replace('I', 'i') for u in _UNITS)})"
        )
    return int(float(match.group(1)) * _UNITS[unit or "B"])


# ---------------------------------------------------------------------------------------------------------------
# the record


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One rank's machine: memory it may use and the rates of what a training step does."""

    name: str
    """A preset name ("A100-80GB"), or "measured: <device>" for `measure()`."""
    device_bytes: int
    """Device memory of one device (nvidia-smi's memory.total); the planner keeps its own margin for the
    CUDA context and allocator. On a CPU-only machine: half the RAM."""
    host_bytes: int
    """Host memory for one rank: the machine's RAM divided by the devices (ranks) on it. On a CPU-only
    machine: the other half of the RAM."""
    matmul_flops: dict[str, float]
    """FLOP/s that large matmuls achieve, by dtype name ("float32", "bfloat16", "float16"); a dtype the
    device lacks (or runs uselessly slowly) is absent. float32 is strict FP32 in the presets (PyTorch's default);
    `measure()` times the GEMMs of a Linear layer's forward and backward as the process runs them (TF32 if it
    allowed TF32)."""
    h2d_bytes_per_s: float
    """Host-to-device copy bandwidth, from pinned staging memory on a GPU."""
    d2h_bytes_per_s: float
    """Device-to-host copy bandwidth, into pinned staging memory on a GPU."""
    collective_bytes_per_s: dict[int, float] = field(default_factory=dict)
    """Bus bandwidth per device of all-gather / reduce-scatter, by world size, as nccl-tests defines it:
    (n - 1) / n * gathered bytes / time. Empty when unknown (a single process that was not measured)."""
    device_optim_elems_per_s: float
    """Elements per second of a fused AdamW step (fp32 master and states) on the device."""
    host_optim_elems_per_s: float
    """Elements per second of a fused AdamW step on the host, for the share of CPU cores one rank has; on a GPU
    machine, as the optimizer's worker runs it beside the compute thread (see `Hardware.measure`)."""
    device_copy_bytes_per_s: float
    """Bytes per second copied from one device buffer into another (each byte read once, written once)."""
    device_type: str = "cuda"
    """"cuda", or "cpu" for a CPU-only machine, where device and host are the same RAM and copies between
    them are synchronous (they occupy the compute thread instead of overlapping with it)."""
    disk_bytes: int = 0
    """Scratch-disk space for one rank (the disk tier: masters and optimizer states with optim_home="disk");
    0: no disk tier."""
    disk_read_bytes_per_s: float = 0.0
    """Sequential read bandwidth of the scratch disk for one rank (large O_DIRECT transfers)."""
    disk_write_bytes_per_s: float = 0.0
    """Sequential write bandwidth of the scratch disk for one rank."""
    attention_flops: dict[str, float] = field(default_factory=dict)
    """FLOP/s of fused attention (forward and backward of `scaled_dot_product_attention`, causal, FLOPs by
    torch.utils.flop_counter's formulas), by dtype name. Absent: the matmul rate. Fused attention also computes
    a softmax per score and skips masked blocks, so its rate by those formulas differs from a GEMM's (on this
    CPU ~0.7x); on GPUs FlashAttention-2 reaches roughly the fraction of peak that large GEMMs do, so the presets
    leave it out."""
    grouped_mm_flops: dict[str, float] = field(default_factory=dict)
    """FLOP/s of `torch._grouped_mm` (the experts of Hugging Face's MoE models), forward and backward, FLOPs as
    the profile counts them, by dtype name. Absent: the matmul rate. On a CPU the products of the groups run one
    by one on the experts' transposed weights (on the 2-core CPU of BENCHMARKS.md ~0.77x the Linear rate)."""
    intra_node_latency_s: float = 0.0
    """Latency of one step of a ring collective between the devices of a node (NVLink/NVSwitch: a few
    microseconds); 0: none counted beyond the cost model's fixed cost per collective. `measure()` on several
    nodes times it (a one-element all-gather over a node's ranks, per ring step); on one node it stays 0."""
    inter_node_bytes_per_s: float = 0.0
    """Bandwidth of one node's links to the other nodes, all its NICs together, as collectives achieve it:
    the ranks of a node share it when a collective crosses nodes (see `bus_rate`). 0: one level, as before
    (a collective over more ranks than a node's runs at `collective_rate` of its size). `measure()` on several
    nodes times it: the all-reduce over one rank per node that chunks sharded inside nodes make, every local
    rank's at once, its ranks' bus bandwidths added up."""
    inter_node_latency_s: float = 0.0
    """Latency of one step of a ring collective between nodes (InfiniBand a few microseconds, Ethernet tens);
    `measure()` on several nodes times a one-element all-reduce over one rank per node, per ring step."""
    op_overhead_s: float = 0.0
    """Seconds every operator of a training step costs beyond its kernel: Python between operators, module
    calls, dispatch, autograd's bookkeeping, a kernel launch. `measure()` times it as one forward and backward
    of a tiny transformer (where kernels take next to nothing) divided by its operators. 0: the cost model's
    default (4 us on a CPU, 6 us on a GPU)."""
    matmul_by_size: dict[str, dict[int, float]] = field(default_factory=dict)
    """FLOP/s of matmuls by dtype name and by the FLOPs of one product, from calibrations at several sizes: a
    small product runs below the rate of a large one (on the 2-core CPU of BENCHMARKS.md ~120-145 GFLOP/s at
    4-34 MFLOP against ~165 at 0.3-2 GFLOP; on a GPU far more, a product must fill the device). `matmul_rate`
    interpolates it. Empty (or a dtype absent): `matmul_flops` for every size."""
    eager_bytes_per_s: float = 0.0
    """Bytes per second that memory-bound operators (elementwise, normalisation, softmax, reductions, cat) read
    and write, counted as the profile counts them (see [Note: what a memory-bound operator costs] in
    elixir/profile/trace.py). 0: `device_copy_bytes_per_s`."""
    eager_rates: dict[int, float] = field(default_factory=dict)
    """Bytes per second of memory-bound operators by the bytes one operator moves (reads and writes), from
    calibrations at several tensor sizes: operators on tensors that stay in the caches run several times faster
    than on tensors that stream from memory (on the 2-core CPU of BENCHMARKS.md ~23 GB/s at 0.5-2 MB moved per
    operator, 9-12 GB/s at 7-29 MB). `eager_rate` interpolates it. Empty: `eager_bytes_per_s` for every size."""
    interception_op_s: float = 0.0
    """Seconds every operator costs on top of `op_overhead_s` while Elixir intercepts parameter uses (a plan
    with on-demand chunks: the torch-function mode, module hooks and saved-tensor hooks of
    elixir/runtime/hooks.py). `measure()` times a small transformer of width 256 wrapped with one on-demand chunk
    that never leaves the cache against the same model all resident (see [Note: the runtime's overheads, among
    real kernels] in elixir/hardware/measure.py). 0: not charged."""
    fetch_overhead_s: float = 0.0
    """Seconds of the runtime's own work per chunk fetch (cache bookkeeping, eviction and prefetch choices) on
    the compute thread, beyond the copy and the collective's fixed cost, which the cost model charges on their
    own: `measure()` times a tiny transformer with many small on-demand chunks against one, and leaves those
    two out. 0: not charged."""
    optim_step_overhead_s: float = 0.0
    """Seconds of one optimizer step call beyond its elements (Python, state lookups, dispatch), paid once per
    chunk update: `measure()` times fused AdamW on one element (on the 2-core CPU of BENCHMARKS.md ~0.1-0.25 ms,
    as much as 250k elements' update). 0: not charged."""
    host_bytes_per_s: float = 0.0
    """Bytes per second read and written by memory-bound operators on the host of a GPU machine, over buffers far
    larger than its caches: the optimizer's worker checks a host chunk's fp32 gradient for an inf or a NaN and
    copies it into the rollback log in the compute dtype before each update (see [Note: the gradient check before
    an update] in elixir/search/cost.py). `measure()` times that cast and that sum on 2**25 elements. 0: not
    measured (a CPU device, where `eager_rates` price them, or a preset): the share of the host's AdamW step that
    those bytes are of its 28 per element (`host_stream_rate`)."""
    spare_cores: float = 0.0
    """Cores per rank that no compute thread uses: (cores the process may use - ranks on the machine x
    torch threads per rank) / ranks, at least 0, as `measure()` finds them. Read on a CPU device only, where the
    optimizer's worker thread (the step inside backward) computes on the same cores as the model: with a spare
    core its updates hide behind backward; without one they take their time from the compute threads (see
    [Note: the worker without a core of its own] in elixir/search/cost.py). On a GPU the model computes on
    the device and the worker has the host's cores. 0: no spare core."""
    compute_scale: float = 1.0
    """The model being planned runs its operators `compute_scale` times as long as the rates above predict:
    measured by timing one of its blocks and the rest of its step on the device (see [Note: one block of the
    model, timed] in elixir/search/block.py) and set with `with_compute_scale`. A property of a model on a
    machine, not of the machine: never written to JSON, so a calibration (and its cache) always has 1.0."""
    measured_here: bool = field(default=False, compare=False)
    """`Hardware.measure()` made this record (or read it from this machine's cache) in this process: it
    describes the device at hand, so the planner may time the model's own block on it. Never written to
    JSON; a record read from a file or a preset has False."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Hardware.name must not be empty")
        if not (isinstance(self.compute_scale, (int, float)) and 0 < self.compute_scale < math.inf):
            raise ValueError(f"Hardware.compute_scale={self.compute_scale!r} must be a positive finite number "
                             "(1.0: the operators take what the rates predict)")
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"Hardware.device_type={self.device_type!r}; use 'cuda' or 'cpu'")
        for what in ("device_bytes", "host_bytes"):
            value = getattr(self, what)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Hardware.{what}={value!r} must be a positive number of bytes (see parse_bytes)")
        for what in (
            "h2d_bytes_per_s",
            "d2h_bytes_per_s",
            "device_optim_elems_per_s",
            "host_optim_elems_per_s",
            "device_copy_bytes_per_s",
        ):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"Hardware.{what}={value!r} must be a positive finite rate")
        if not self.matmul_flops:
            raise ValueError("Hardware.matmul_flops is empty; give the FLOP/s of at least one dtype, e.g. 'float32'")
        for dtype, rate in self.matmul_flops.items():
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"Hardware.matmul_flops has dtype {dtype!r}; use 'float32', 'bfloat16', 'float16'")
            if not (rate > 0 and math.isfinite(rate)):
                raise ValueError(f"Hardware.matmul_flops[{dtype!r}]={rate!r} must be a positive finite FLOP/s")
        for what in ("attention_flops", "grouped_mm_flops"):
            for dtype, rate in getattr(self, what).items():
                if dtype not in ("float32", "bfloat16", "float16") or not (rate > 0 and math.isfinite(rate)):
                    raise ValueError(
                        f"Hardware.{what}[{dtype!r}]={rate!r}: keys are 'float32', 'bfloat16', 'float16', "
                        "values positive finite FLOP/s"
                    )
        for dtype, sizes in self.matmul_by_size.items():
            if dtype not in self.matmul_flops or not isinstance(sizes, dict):
                raise ValueError(f"Hardware.matmul_by_size[{dtype!r}]: keys are dtypes of matmul_flops "
                                 f"({', '.join(self.matmul_flops)}), values {{FLOPs of one product: FLOP/s}}")
            for flops, rate in sizes.items():
                if not (isinstance(flops, int) and not isinstance(flops, bool) and flops >= 1
                        and isinstance(rate, (int, float)) and rate > 0 and math.isfinite(rate)):
                    raise ValueError(
                        f"Hardware.matmul_by_size[{dtype!r}][{flops!r}]={rate!r}: keys are FLOPs of one product "
                        "(ints >= 1), values positive finite FLOP/s"
                    )
        if not isinstance(self.disk_bytes, int) or isinstance(self.disk_bytes, bool) or self.disk_bytes < 0:
            raise ValueError(f"Hardware.disk_bytes={self.disk_bytes!r} must be 0 (no disk tier) or a number of bytes")
        for what in ("disk_read_bytes_per_s", "disk_write_bytes_per_s"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"Hardware.{what}={value!r} must be a finite rate, 0 when there is no disk")
            if self.disk_bytes and not value:
                raise ValueError(f"Hardware.disk_bytes={self.disk_bytes} needs {what} too (e.g. 5e9 for an NVMe)")
        for what in ("intra_node_latency_s", "inter_node_bytes_per_s", "inter_node_latency_s"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                    and math.isfinite(value)):
                raise ValueError(f"Hardware.{what}={value!r} must be a finite number >= 0 (0: not modelled)")
        for what in ("op_overhead_s", "eager_bytes_per_s", "interception_op_s", "fetch_overhead_s",
                     "optim_step_overhead_s", "host_bytes_per_s", "spare_cores"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                    and math.isfinite(value)):
                raise ValueError(f"Hardware.{what}={value!r} must be a finite number >= 0 (0: the default)")
        for nbytes, rate in self.eager_rates.items():
            if not (isinstance(nbytes, int) and not isinstance(nbytes, bool) and nbytes >= 1
                    and isinstance(rate, (int, float)) and rate > 0 and math.isfinite(rate)):
                raise ValueError(
                    f"Hardware.eager_rates[{nbytes!r}]={rate!r}: keys are bytes moved per operator (ints >= 1), "
                    "values positive finite bytes/s"
                )
        for world, rate in self.collective_bytes_per_s.items():
            if not (isinstance(world, int) and world >= 2 and rate > 0 and math.isfinite(rate)):
                raise ValueError(
                    f"Hardware.collective_bytes_per_s[{world!r}]={rate!r}: keys are world sizes >= 2, values "
                    "positive bytes/s"
                )

    def __hash__(self) -> int:  # the dict fields are not hashable; the JSON text is
        return hash(self.to_json())

    # ---- lookups the cost model uses ----

    def matmul_rate(self, dtype: torch.dtype | str, flops: float | None = None) -> float:
        """FLOP/s of matmuls in `dtype`: of large ones, or of one product of `flops` FLOPs (`matmul_by_size`
        interpolated linearly in the logarithm of the size, held at its ends beyond the sizes measured);
        ValueError when this hardware has no figure for the dtype."""
        name = str(dtype).removeprefix("torch.")
        if name not in self.matmul_flops:
            raise ValueError(
                f"{self.name} has no matmul rate for {name}; it has {', '.join(self.matmul_flops)}: "
                "pick one of those as compute dtype"
            )
        sizes = self.matmul_by_size.get(name)
        if flops is None or not sizes:
            return self.matmul_flops[name]
        return _interpolate_log(sorted(sizes.items()), flops)

    def attention_rate(self, dtype: torch.dtype | str) -> float:
        """FLOP/s of fused attention in `dtype`: the measured figure, else the matmul rate."""
        name = str(dtype).removeprefix("torch.")
        return self.attention_flops.get(name) or self.matmul_rate(name)

    def grouped_mm_rate(self, dtype: torch.dtype | str) -> float:
        """FLOP/s of `torch._grouped_mm` in `dtype`: the measured figure, else the matmul rate."""
        name = str(dtype).removeprefix("torch.")
        return self.grouped_mm_flops.get(name) or self.matmul_rate(name)

    def eager_rate(self, nbytes: float) -> float:
        """Bytes per second of a memory-bound operator that moves `nbytes` (reads and writes): `eager_rates`
        interpolated linearly in the logarithm of the size, held at its ends beyond the sizes measured;
        `eager_bytes_per_s` (else `device_copy_bytes_per_s`) without them."""
        if not self.eager_rates:
            return self.eager_bytes_per_s or self.device_copy_bytes_per_s
        return _interpolate_log(sorted(self.eager_rates.items()), nbytes)

    def collective_rate(self, world_size: int) -> float:
        """Bus bandwidth per device for `world_size` ranks: the figure for that size, else for the nearest
        larger size measured (bandwidth does not grow with the group), else for the largest. A world of one
        communicates nothing (infinite rate)."""
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        if world_size == 1:
            return math.inf
        if not self.collective_bytes_per_s:
            raise ValueError(
                f"{self.name} has no collective bandwidth: run Hardware.measure() on every rank after "
                "torch.distributed is initialised, or use a preset"
            )
        larger = [w for w in self.collective_bytes_per_s if w >= world_size]
        return self.collective_bytes_per_s[min(larger) if larger else max(self.collective_bytes_per_s)]

    def bus_rate(self, group_size: int, *, across_nodes: bool = False, ranks_per_node: int = 0,
                 world_size: int = 0) -> float:
        """Bus bandwidth per rank of a collective over `group_size` ranks. Inside a node: `collective_rate`
        of the group. Across nodes, with `inter_node_bytes_per_s` known: the node's share per rank (its
        `ranks_per_node` ranks cross at once), capped by the rate inside a node; without it, as before:
        `collective_rate` of the run's `world_size` (what a preset gives for more ranks than a node has)."""
        if not across_nodes:
            return self.collective_rate(group_size)
        if self.inter_node_bytes_per_s:
            per_node = max(ranks_per_node, 1)
            inside = self.collective_rate(min(group_size, per_node)) if per_node > 1 else math.inf
            return min(inside, self.inter_node_bytes_per_s / per_node)
        return self.collective_rate(max(world_size, group_size))

    def step_latency_s(self, across_nodes: bool) -> float:
        """Latency of one ring step of a collective inside a node, or across nodes."""
        return self.inter_node_latency_s if across_nodes else self.intra_node_latency_s

    def with_network(self, *, inter_node_bytes_per_s: float | None = None, inter_node_latency_s: float | None = None,
                     intra_node_latency_s: float | None = None) -> Hardware:
        """A copy with another network between nodes (`parse_link` reads "4x200Gbps", "ib-hdr-200g", ...)."""
        changes: dict = {}
        if inter_node_bytes_per_s is not None:
            changes["inter_node_bytes_per_s"] = float(inter_node_bytes_per_s)
        if inter_node_latency_s is not None:
            changes["inter_node_latency_s"] = float(inter_node_latency_s)
        if intra_node_latency_s is not None:
            changes["intra_node_latency_s"] = float(intra_node_latency_s)
        return dataclasses.replace(self, **changes)

    def host_stream_rate(self) -> float:
        """Bytes per second of memory-bound operators on the host of a GPU machine: `host_bytes_per_s`, or where
        that was not measured, the bytes of a fused AdamW step on the host at its rate (28 per element: the
        parameter, gradient and two moments read, three of them written)."""
        return self.host_bytes_per_s or ADAMW_BYTES_PER_ELEMENT * self.host_optim_elems_per_s

    def with_compute_scale(self, scale: float) -> Hardware:
        """A copy whose operators take `scale` times as long as its rates predict (see `compute_scale`)."""
        return dataclasses.replace(self, compute_scale=float(scale))

    def with_memory(self, *, device_bytes: int | str | None = None, host_bytes: int | str | None = None) -> Hardware:
        """A copy with other memory sizes (bytes, or human sizes such as "40GiB")."""
        changes = {}
        if device_bytes is not None:
            changes["device_bytes"] = parse_bytes(device_bytes)
        if host_bytes is not None:
            changes["host_bytes"] = parse_bytes(host_bytes)
        return dataclasses.replace(self, **changes)

    def with_disk(self, *, disk_bytes: int | str | None = None, read_bytes_per_s: float | None = None,
                  write_bytes_per_s: float | None = None) -> Hardware:
        """A copy with another scratch disk (bytes or a human size; bandwidths in bytes/s)."""
        changes: dict = {}
        if disk_bytes is not None:
            changes["disk_bytes"] = parse_bytes(disk_bytes) if isinstance(disk_bytes, str) else int(disk_bytes)
        if read_bytes_per_s is not None:
            changes["disk_read_bytes_per_s"] = float(read_bytes_per_s)
        if write_bytes_per_s is not None:
            changes["disk_write_bytes_per_s"] = float(write_bytes_per_s)
        return dataclasses.replace(self, **changes)

    # ---- presets ----

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        from elixir.hardware.presets import _PRESETS

        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str) -> Hardware:
        """Datasheet figures times realistic achieved fractions for a named machine (one rank's view)."""
        from elixir.hardware.presets import _PRESETS

        if name not in _PRESETS:
            raise ValueError(f"unknown hardware preset {name!r}; the presets are: {', '.join(_PRESETS)}")
        return _PRESETS[name]()

    # ---- JSON ----

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for name in _NOT_WRITTEN:
            del data[name]
        data["collective_bytes_per_s"] = {str(w): r for w, r in self.collective_bytes_per_s.items()}
        data["eager_rates"] = {str(b): r for b, r in self.eager_rates.items()}
        data["matmul_by_size"] = {d: {str(f): r for f, r in sizes.items()} for d, sizes in self.matmul_by_size.items()}
        data["format_version"] = _FORMAT_VERSION
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "hardware JSON") -> Hardware:
        """The record `to_json` wrote; every field is checked for presence, type and range (see [Note:
        untrusted files] in elixir/validation.py), and a ValueError names `source`, the field and what was
        expected."""
        from elixir.validation import Fields, load_json

        doc = Fields(load_json(text, source, what="measure again"), source)
        version = doc.data.get("format_version")
        if version != _FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"{source}: hardware format_version={version!r}, this elixir reads {_FORMAT_VERSION}; "
                             "measure again")
        doc.only(("format_version", *_HARDWARE_FIELDS))
        data = {"name": doc.get("name", "str")}
        for what in ("device_bytes", "host_bytes"):
            data[what] = doc.get(what, "int", least=1)
        for what in ("h2d_bytes_per_s", "d2h_bytes_per_s", "device_optim_elems_per_s", "host_optim_elems_per_s",
                     "device_copy_bytes_per_s"):
            data[what] = doc.get(what, "number", above=0)
        for what in ("matmul_flops", "attention_flops", "grouped_mm_flops"):
            rates = doc.obj(what) if what == "matmul_flops" else doc.obj(what, default=None)
            for dtype in (rates.data if rates else ()):
                rates.get(dtype, "number", above=0)
            data[what] = dict(rates.data) if rates else {}
        data["collective_bytes_per_s"] = _rates_by_int(doc, "collective_bytes_per_s", 2,
                                                       "is not a world size; keys are world sizes >= 2")
        by_size = doc.obj("matmul_by_size", default=None)
        data["matmul_by_size"] = {dtype: _rates_by_int(by_size, dtype, 1, "is not a size; keys are FLOPs of one "
                                                        "product >= 1") for dtype in (by_size.data if by_size else ())}
        data["eager_rates"] = _rates_by_int(doc, "eager_rates", 1,
                                            "is not a size; keys are bytes moved per operator >= 1")
        data["device_type"] = doc.get("device_type", "str", default="cuda", choices=("cuda", "cpu"))
        data["disk_bytes"] = doc.get("disk_bytes", "int", least=0, default=0)
        for what in ("disk_read_bytes_per_s", "disk_write_bytes_per_s", "intra_node_latency_s",
                     "inter_node_bytes_per_s", "inter_node_latency_s", "op_overhead_s", "eager_bytes_per_s",
                     "interception_op_s", "fetch_overhead_s", "optim_step_overhead_s", "host_bytes_per_s",
                     "spare_cores"):
            data[what] = doc.get(what, "number", least=0, default=0.0)
        try:  # what no single field says (a disk size without a bandwidth, an unknown dtype)
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    # ---- measurement ----

    @classmethod
    def measure(cls, cache: bool = True, *, quick: bool = False, refresh: bool = False,
                disk: str | None = None) -> Hardware:
        """Calibrate the rates on this machine (a few seconds; `quick` takes about one, less precisely).
        `disk`: a scratch folder for the disk tier; its free space and sequential read and write
        bandwidth are measured too (see `measure_disk`), and shared by the ranks on this machine.

        With `cache`, the result is read from, or written to,
        cache_dir()/hardware-<host>-<device>-torch<version>-<threads>threads.json (see `_cache_path` in
        elixir/hardware/cache.py), with
        `-<n>ranks` before `.json` when n ranks of the job share the machine, and `-<m>nodes` when the job
        spans m nodes (`refresh` measures again and overwrites it). When torch.distributed is initialised
        every rank must call this together: the collectives are measured over the world group, and a cache
        without that world size on any rank makes every rank measure. On several nodes (torchrun's
        LOCAL_WORLD_SIZE below its WORLD_SIZE) both levels of the network are measured too: the collectives
        inside a node (`collective_bytes_per_s` of its ranks, `intra_node_latency_s`) and across nodes
        (`inter_node_bytes_per_s`, `inter_node_latency_s`), in the same time as one node's calibration.
        """
        from elixir.hardware.measure import measure_machine

        return measure_machine(cache=cache, quick=quick, refresh=refresh, disk=disk)


def _interpolate_log(points: list[tuple[int, float]], x: float) -> float:
    """The rate at size `x` of `points` ((size, rate), sorted by size): linear in the logarithm of the size
    between two measured sizes, the nearest end's rate beyond them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, r0), (x1, r1) in zip(points, points[1:]):
        if x <= x1:
            t = math.log(x / x0) / math.log(x1 / x0)
            return r0 + t * (r1 - r0)
    return points[-1][1]


def _rates_by_int(doc, key: str, least: int, wrong_key: str) -> dict[int, float]:
    """The optional object `key` of `doc` (validation.Fields): positive rates under keys that are ints >= `least`
    written as strings; `wrong_key` says what a bad key is not."""
    obj = doc.obj(key, default=None)
    rates: dict[int, float] = {}
    for k in (obj.data if obj else ()):
        rate = obj.get(k, "number", above=0)
        if not k.isdigit() or int(k) < least:
            raise obj.fail(obj.path(k), wrong_key)
        rates[int(k)] = rate
    return rates


_NOT_WRITTEN = ("compute_scale", "measured_here")  # the model's and the process's, not the machine's
_HARDWARE_FIELDS = tuple(f.name for f in dataclasses.fields(Hardware) if f.name not in _NOT_WRITTEN)
