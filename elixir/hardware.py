"""What a machine can do, as the planner's cost model needs it: memory sizes and measured rates.

A `Hardware` is a frozen record of one rank's view of a machine: the device memory it may fill, its
share of host memory, and the rates that decide a training step's time (matmul FLOP/s per dtype,
host<->device copy bandwidth, collective bus bandwidth per world size, AdamW update rate on device and
on host, device-internal copy bandwidth). `Hardware.preset(name)` gives figures for machines one does not
have (datasheet peaks times the fraction large kernels achieve in practice, with sources); `Hardware.measure()`
calibrates the machine at hand in a few seconds and caches the result.

On a CPU-only machine "device" and "host" are the same RAM (docs/architecture.md, "CPU-only machines"):
the device rates are measured on buffers kept apart from the host ones, as the runtime keeps them, and
each side gets half the RAM so that a plan filling both still fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elixir import comm

__all__ = ["INTER_NODE_LINKS", "Hardware", "cache_dir", "parse_bytes", "parse_link"]

# 2: attention_flops; AdamW on buffers beyond the last-level cache; Linear-layer GEMMs
# 3: CPU collectives as the runtime runs them (all-to-alls, shared memory between ranks of one host)
# 4: the costs of running operators (per operator, interception, per fetch, memory-bound operators)
_FORMAT_VERSION = 4
_DISK_FORMAT_VERSION = 3  # the disk cache's own format: unchanged since version 3 of the hardware record
GiB = 2**30

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


def _machine_busy() -> str:
    """Why the CPU is too busy to calibrate on, or "" when it is quiet: the 1-minute load average,
    less this job's own ranks on this machine, above half of the cores this process may use."""
    if not hasattr(os, "getloadavg"):
        return ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    own = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    load = os.getloadavg()[0]
    if load - own > 0.5 * cores:
        return f"load average {load:.1f} with {own} rank(s) of this job on {cores} core(s)"
    return ""


def cache_dir() -> Path:
    """Where elixir caches what it measured: $ELIXIR_CACHE_DIR, else ~/.cache/elixir.

    The one place that reads ELIXIR_CACHE_DIR; everything else asks this function."""
    configured = os.environ.get("ELIXIR_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "elixir"


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
    """Elements per second of a fused AdamW step on the host, for the share of CPU cores one rank has."""
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
    intra_node_latency_s: float = 0.0
    """Latency of one step of a ring collective between the devices of a node (NVLink/NVSwitch: a few
    microseconds); 0: none counted beyond the cost model's fixed cost per collective."""
    inter_node_bytes_per_s: float = 0.0
    """Bandwidth of one node's links to the other nodes, all its NICs together, as collectives achieve it:
    the ranks of a node share it when a collective crosses nodes (see `bus_rate`). 0: one level, as before
    (a collective over more ranks than a node's runs at `collective_rate` of its size)."""
    inter_node_latency_s: float = 0.0
    """Latency of one step of a ring collective between nodes (InfiniBand a few microseconds, Ethernet tens)."""
    op_overhead_s: float = 0.0
    """Seconds every operator of a training step costs beyond its kernel: Python between operators, module
    calls, dispatch, autograd's bookkeeping, a kernel launch. `measure()` times it as one forward and backward
    of a tiny transformer (where kernels take next to nothing) divided by its operators. 0: the cost model's
    default (4 us on a CPU, 6 us on a GPU)."""
    eager_bytes_per_s: float = 0.0
    """Bytes per second that memory-bound operators (elementwise, normalisation, softmax, reductions, cat) read
    and write, counted as the profile counts them (see [Note: what a memory-bound operator costs] in
    elixir/profile/trace.py). 0: `device_copy_bytes_per_s`."""
    interception_op_s: float = 0.0
    """Seconds every operator costs on top of `op_overhead_s` while Elixir intercepts parameter uses (a plan
    with on-demand chunks: the torch-function mode, module hooks and saved-tensor hooks of
    elixir/runtime/hooks.py). `measure()` times a tiny transformer wrapped with one on-demand chunk that never
    leaves the cache against the same model all resident. 0: not charged."""
    fetch_overhead_s: float = 0.0
    """Seconds of the runtime's own work per chunk fetch (cache bookkeeping, eviction and prefetch choices) on
    the compute thread, beyond the copy and the collective: `measure()` times the tiny transformer with many
    small on-demand chunks against one. 0: not charged."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Hardware.name must not be empty")
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
        for dtype, rate in self.attention_flops.items():
            if dtype not in ("float32", "bfloat16", "float16") or not (rate > 0 and math.isfinite(rate)):
                raise ValueError(
                    f"Hardware.attention_flops[{dtype!r}]={rate!r}: keys are 'float32', 'bfloat16', 'float16', "
                    "values positive finite FLOP/s"
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
        for what in ("op_overhead_s", "eager_bytes_per_s", "interception_op_s", "fetch_overhead_s"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                    and math.isfinite(value)):
                raise ValueError(f"Hardware.{what}={value!r} must be a finite number >= 0 (0: the default)")
        for world, rate in self.collective_bytes_per_s.items():
            if not (isinstance(world, int) and world >= 2 and rate > 0 and math.isfinite(rate)):
                raise ValueError(
                    f"Hardware.collective_bytes_per_s[{world!r}]={rate!r}: keys are world sizes >= 2, values "
                    "positive bytes/s"
                )

    def __hash__(self) -> int:  # the dict fields are not hashable; the JSON text is
        return hash(self.to_json())

    # ---- lookups the cost model uses ----

    def matmul_rate(self, dtype: torch.dtype | str) -> float:
        """FLOP/s of large matmuls in `dtype`; ValueError when this hardware has no figure for it."""
        name = str(dtype).removeprefix("torch.")
        if name not in self.matmul_flops:
            raise ValueError(
                f"{self.name} has no matmul rate for {name}; it has {', '.join(self.matmul_flops)}: "
                "pick one of those as compute dtype"
            )
        return self.matmul_flops[name]

    def attention_rate(self, dtype: torch.dtype | str) -> float:
        """FLOP/s of fused attention in `dtype`: the measured figure, else the matmul rate."""
        name = str(dtype).removeprefix("torch.")
        return self.attention_flops.get(name) or self.matmul_rate(name)

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
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str) -> Hardware:
        """Datasheet figures times realistic achieved fractions for a named machine (one rank's view)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown hardware preset {name!r}; the presets are: {', '.join(_PRESETS)}")
        return _PRESETS[name]()

    # ---- JSON ----

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["collective_bytes_per_s"] = {str(w): r for w, r in self.collective_bytes_per_s.items()}
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
        for what in ("matmul_flops", "attention_flops"):
            rates = doc.obj(what, default=None) if what == "attention_flops" else doc.obj(what)
            for dtype in (rates.data if rates else ()):
                rates.get(dtype, "number", above=0)
            data[what] = dict(rates.data) if rates else {}
        collective = doc.obj("collective_bytes_per_s", default=None)
        data["collective_bytes_per_s"] = {}
        for world in (collective.data if collective else ()):
            rate = collective.get(world, "number", above=0)
            if not world.isdigit() or int(world) < 2:
                raise collective.fail(collective.path(world), "is not a world size; keys are world sizes >= 2")
            data["collective_bytes_per_s"][int(world)] = rate
        data["device_type"] = doc.get("device_type", "str", default="cuda", choices=("cuda", "cpu"))
        data["disk_bytes"] = doc.get("disk_bytes", "int", least=0, default=0)
        for what in ("disk_read_bytes_per_s", "disk_write_bytes_per_s", "intra_node_latency_s",
                     "inter_node_bytes_per_s", "inter_node_latency_s", "op_overhead_s", "eager_bytes_per_s",
                     "interception_op_s", "fetch_overhead_s"):
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
        cache_dir()/hardware-<host>-<device>-torch<version>-<threads>threads.json (see `_cache_path`), with
        `-<n>ranks` before `.json` when n ranks of the job share the machine (`refresh` measures again and
        overwrites it). When torch.distributed is initialised every rank must call this together: the
        collectives are measured over the world group, and a cache without that world size on any rank makes
        every rank measure.
        """
        path = _cache_path(quick)
        cached = _read_cache(path) if cache and not refresh else None
        world = comm.rank_and_world()[1]
        usable = cached is not None and (world == 1 or world in cached.collective_bytes_per_s)
        if world > 1:
            usable = comm.every_rank(usable, comm.world_group(), device=_device(),
                                     what="all-reduce of the calibration cache checks")
        if usable:
            assert cached is not None
            return cached if disk is None else _with_measured_disk(cached, disk, cache, quick, refresh)
        busy = _machine_busy()
        hardware = _measure(quick)
        if busy:
            # rates measured while other work competes for the machine are low; using them for this run
            # is the best there is, but a cache would hand them to every later run
            warnings.warn(
                f"Hardware.measure(): the machine is busy ({busy}); the measured rates are used but not cached. "
                "Measure again on a quiet machine (Hardware.measure(refresh=True)) for figures later runs can trust",
                stacklevel=2,
            )
            cache = False
        if cached is not None:  # keep the collective figures of other world sizes
            merged = {**cached.collective_bytes_per_s, **hardware.collective_bytes_per_s}
            hardware = dataclasses.replace(hardware, collective_bytes_per_s=dict(sorted(merged.items())))
        if cache:
            _write_cache(path, hardware.to_json())
        return hardware if disk is None else _with_measured_disk(hardware, disk, cache, quick, refresh)


def measure_disk(folder: str, *, cache: bool = True, quick: bool = False, refresh: bool = False) -> tuple[float, float]:
    """(read, write) bytes/s of large sequential O_DIRECT transfers in `folder` (the whole machine's: ranks
    share it), as the disk tier does them. Cached per filesystem in cache_dir() like the other rates. The folder
    is made if it does not exist (it is the scratch folder the disk tier is about to use)."""
    os.makedirs(folder, exist_ok=True)
    st = os.stat(folder)
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()) or "host"
    path = cache_dir() / f"disk-{host}-{st.st_dev}{'-quick' if quick else ''}.json"
    if cache and not refresh:
        cached = _read_disk_cache(path)
        if cached is not None:
            return cached
    read, write = _disk_bytes_per_s(folder, (64 if quick else 256) * 2**20)
    if cache and not _machine_busy():
        _write_cache(path, json.dumps({"format_version": _DISK_FORMAT_VERSION, "folder": os.path.abspath(folder),
                                       "read_bytes_per_s": read, "write_bytes_per_s": write}))
    return read, write


def _read_disk_cache(path: Path) -> tuple[float, float] | None:
    """(read, write) bytes/s of a disk cache file, or None when there is none; damaged or of another format
    version, it is ignored with a one-line warning, as `_read_cache` does."""
    from elixir.validation import Fields, load_json

    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        _ignore_cache(path, e.strerror or str(e))
        return None
    try:
        doc = Fields(load_json(text, str(path)), str(path))
        version = doc.data.get("format_version")
        if version != _DISK_FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"format_version={version!r}, this elixir reads {_DISK_FORMAT_VERSION}")
        doc.get("folder", "str", default="")
        return float(doc.get("read_bytes_per_s", "number", above=0)), float(doc.get("write_bytes_per_s", "number",
                                                                                   above=0))
    except ValueError as e:
        _ignore_cache(path, str(e).removeprefix(f"{path}: "))
        return None


def _with_measured_disk(hardware: Hardware, folder: str, cache: bool, quick: bool, refresh: bool) -> Hardware:
    read, write = measure_disk(folder, cache=cache, quick=quick, refresh=refresh)
    st = os.statvfs(folder)
    ranks = _local_ranks()
    return hardware.with_disk(disk_bytes=st.f_bavail * st.f_frsize // ranks, read_bytes_per_s=read / ranks,
                              write_bytes_per_s=write / ranks)


_HARDWARE_FIELDS = tuple(f.name for f in dataclasses.fields(Hardware))


# ---------------------------------------------------------------------------------------------------------------
# presets
#
# Achieved fractions used throughout (peaks are from the datasheets cited at each figure):
_MATMUL_ACHIEVED = 0.65  # large bf16/fp16 GEMMs in training reach ~60-70% of the tensor-core peak
_FP32_ACHIEVED = 0.85  # strict-FP32 SIMT GEMMs run close to the CUDA-core peak
_HBM_ACHIEVED = 0.8  # streaming kernels reach ~80% of the memory bandwidth
# A fused AdamW step streams ~32 bytes per element: reads fp32 grad, param, exp_avg, exp_avg_sq (16 B), writes
# param, exp_avg, exp_avg_sq (12 B) and the compute-dtype copy of the param (2 B), rounded up.
_ADAM_BYTES_PER_ELEM = 32
_PCIE4_ACHIEVED = 25e9  # PCIe 4.0 x16: 31.5 GB/s per direction; ~25 GB/s pinned (CUDA bandwidthTest)
_PCIE5_ACHIEVED = 50e9  # PCIe 5.0 x16: 63 GB/s per direction; ~50 GB/s pinned (CUDA bandwidthTest)
# Host-side AdamW for one rank of an 8-GPU server: two sockets of 8-channel DDR4-3200 (2 x 204.8 GB/s) or
# DDR5-4800 (2 x 307 GB/s) at ~60% achieved, shared by 8 ranks, / 32 B per element. ZeRO-Offload reports
# CPU-Adam around 1e9 parameters/s on such servers, which agrees.
_HOST_ADAM_DDR4 = 2 * 204.8e9 * 0.6 / 8 / _ADAM_BYTES_PER_ELEM  # ~0.96e9
_HOST_ADAM_DDR5 = 2 * 307.2e9 * 0.6 / 8 / _ADAM_BYTES_PER_ELEM  # ~1.4e9
# Scratch NVMe per rank, as (bytes, read B/s, write B/s) at ~90% of the drives' sequential datasheet figures.
# DGX A100: 4 x 3.84 TB U.2 Gen4 drives (Samsung PM1733 datasheet: 7,000 MB/s read, 3,800 MB/s write) for 8
# GPUs. DGX H100/H200: 8 x 3.84 TB U.2 Gen4 drives, one per GPU. A workstation: one 2 TB PCIe 4.0 M.2 drive
# (Samsung 990 PRO datasheet: 7,450 MB/s read, 6,900 MB/s write) for its 4 GPUs.
_NVME_DGX_A100 = (4 * 3840 * 10**9 // 8, 0.9 * 4 * 7.0e9 / 8, 0.9 * 4 * 3.8e9 / 8)
_NVME_DGX_H100 = (3840 * 10**9, 0.9 * 7.0e9, 0.9 * 3.8e9)
_NVME_WORKSTATION = (2000 * 10**9 // 4, 0.9 * 7.45e9 / 4, 0.9 * 6.9e9 / 4)


# Links between nodes, one NIC each, as (bytes/s that NCCL collectives achieve, latency of one ring step).
# InfiniBand HDR (200 Gb/s = 25 GB/s) and NDR (400 Gb/s): nccl-tests reach ~90% of the line rate across nodes
# with GPUDirect RDMA, ~3 us per step. RoCE v2 at 200 Gb/s: ~85%, ~5 us. Ethernet without RDMA (NCCL's socket
# transport over TCP): ~70% of the line rate, ~25 us per step. `parse_link` reads these names, "4x<name>" for
# four NICs per node, or a plain line rate ("100Gbps", "4x200Gbps", taken at 80% and 10 us).
INTER_NODE_LINKS: dict[str, tuple[float, float]] = {
    "ethernet-100g": (0.70 * 100e9 / 8, 25e-6),
    "ethernet-200g": (0.70 * 200e9 / 8, 25e-6),
    "roce-100g": (0.85 * 100e9 / 8, 5e-6),
    "roce-200g": (0.85 * 200e9 / 8, 5e-6),
    "ib-hdr-200g": (0.90 * 200e9 / 8, 3e-6),
    "ib-ndr-400g": (0.90 * 400e9 / 8, 3e-6),
}
_LINE_RATE_ACHIEVED, _LINE_RATE_LATENCY_S = 0.8, 10e-6
_LINK = re.compile(r"^\s*(?:([0-9]+)\s*[xX]\s*)?(.+?)\s*$")
_LINE_RATE = re.compile(r"^([0-9]+(?:\.[0-9]*)?)\s*[Gg](?:bps|b/s|bit/s|bE|be)$")  # gigabits: a lower-case b


def parse_link(text: str) -> tuple[float, float]:
    """(bytes/s, latency s) of a node's links to the other nodes: "ib-hdr-200g", "4xib-hdr-200g" (four NICs),
    or a line rate in gigabits per second, "100Gbps", "100GbE", "4x200Gbps" (80% of it achieved).
    ValueError naming the text and what is accepted."""
    m = _LINK.match(str(text))
    count = int(m.group(1)) if m and m.group(1) else 1
    body = m.group(2) if m else ""
    if count >= 1 and body.lower() in INTER_NODE_LINKS:
        rate, latency = INTER_NODE_LINKS[body.lower()]
        return count * rate, latency
    line = _LINE_RATE.match(body)
    if count >= 1 and line and float(line.group(1)) > 0:
        return count * float(line.group(1)) * 1e9 / 8 * _LINE_RATE_ACHIEVED, _LINE_RATE_LATENCY_S
    raise ValueError(
        f"inter-node link {text!r}: give a node's line rate in gigabits per second (\"100Gbps\", \"4x200Gbps\" "
        f"for four NICs) or a link name ({', '.join(INTER_NODE_LINKS)}), optionally with \"4x\" before it"
    )


def _gpu(
    name: str,
    *,
    device_bytes: int,
    host_bytes: int,
    bf16_peak: float,
    fp32_peak: float,
    hbm_bytes_per_s: float,
    pcie: float,
    collective: dict[int, float],
    host_adam: float,
    disk: tuple[int, float, float] = (0, 0.0, 0.0),
) -> Callable[[], Hardware]:
    return lambda: Hardware(
        name=name,
        disk_bytes=disk[0],
        disk_read_bytes_per_s=disk[1],
        disk_write_bytes_per_s=disk[2],
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        matmul_flops={
            "float32": fp32_peak * _FP32_ACHIEVED,
            "bfloat16": bf16_peak * _MATMUL_ACHIEVED,
            "float16": bf16_peak * _MATMUL_ACHIEVED,
        },
        h2d_bytes_per_s=pcie,
        d2h_bytes_per_s=pcie,
        collective_bytes_per_s=dict(collective),
        device_optim_elems_per_s=hbm_bytes_per_s * _HBM_ACHIEVED / _ADAM_BYTES_PER_ELEM,
        host_optim_elems_per_s=host_adam,
        # a copy reads and writes every byte: half the bandwidth
        device_copy_bytes_per_s=hbm_bytes_per_s * _HBM_ACHIEVED / 2,
    )


_PRESETS: dict[str, Callable[[], Hardware]] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): BF16/FP16 dense 312 TFLOPS, FP32 19.5 TFLOPS, HBM2 1,555 GB/s,
    # NVLink 3 600 GB/s (300 GB/s per direction), PCIe 4.0. nvidia-smi memory.total 40960 MiB.
    # Host: DGX A100 (320 GB) has 1 TB of RAM for 8 GPUs. Collectives: nccl-tests all_gather/reduce_scatter on
    # NVSwitch reach ~230 GB/s bus bandwidth of the 300 GB/s; across nodes one 200 Gb/s HDR NIC per GPU
    # (25 GB/s) gives ~20 GB/s.
    "A100-40GB": _gpu(
        "A100-40GB",
        device_bytes=40960 * 2**20,
        host_bytes=1024 * GiB // 8,
        bf16_peak=312e12,
        fp32_peak=19.5e12,
        hbm_bytes_per_s=1555e9,
        pcie=_PCIE4_ACHIEVED,
        collective={2: 230e9, 4: 230e9, 8: 230e9, 16: 20e9},
        host_adam=_HOST_ADAM_DDR4,
        disk=_NVME_DGX_A100,
    ),
    # Same datasheet, A100 80GB SXM4: HBM2e 2,039 GB/s; nvidia-smi memory.total 81920 MiB. DGX A100 (640 GB)
    # has 2 TB of RAM for 8 GPUs.
    "A100-80GB": _gpu(
        "A100-80GB",
        device_bytes=81920 * 2**20,
        host_bytes=2048 * GiB // 8,
        bf16_peak=312e12,
        fp32_peak=19.5e12,
        hbm_bytes_per_s=2039e9,
        pcie=_PCIE4_ACHIEVED,
        collective={2: 230e9, 4: 230e9, 8: 230e9, 16: 20e9},
        host_adam=_HOST_ADAM_DDR4,
        disk=_NVME_DGX_A100,
    ),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16/FP16 dense 989 TFLOPS (1,979 with sparsity), FP32
    # 67 TFLOPS, HBM3 3.35 TB/s, NVLink 4 900 GB/s (450 per direction), PCIe 5.0. nvidia-smi memory.total
    # 81559 MiB. DGX H100 has 2 TB of RAM for 8 GPUs. nccl-tests on NVSwitch: ~360 GB/s bus bandwidth; across
    # nodes one 400 Gb/s NDR NIC per GPU (50 GB/s) gives ~40 GB/s.
    "H100-80GB": _gpu(
        "H100-80GB",
        device_bytes=81559 * 2**20,
        host_bytes=2048 * GiB // 8,
        bf16_peak=989e12,
        fp32_peak=67e12,
        hbm_bytes_per_s=3350e9,
        pcie=_PCIE5_ACHIEVED,
        collective={2: 360e9, 4: 360e9, 8: 360e9, 16: 40e9},
        host_adam=_HOST_ADAM_DDR5,
        disk=_NVME_DGX_H100,
    ),
    # NVIDIA H200 Tensor Core GPU product brief (SXM): the H100's compute (BF16 dense 989 TFLOPS, FP32
    # 67 TFLOPS) with 141 GB HBM3e at 4.8 TB/s, NVLink 4 900 GB/s, PCIe 5.0. nvidia-smi memory.total
    # 143771 MiB. DGX H200 has 2 TB of RAM for 8 GPUs; collectives as DGX H100.
    "H200": _gpu(
        "H200",
        device_bytes=143771 * 2**20,
        host_bytes=2048 * GiB // 8,
        bf16_peak=989e12,
        fp32_peak=67e12,
        hbm_bytes_per_s=4800e9,
        pcie=_PCIE5_ACHIEVED,
        collective={2: 360e9, 4: 360e9, 8: 360e9, 16: 40e9},
        host_adam=_HOST_ADAM_DDR5,
        disk=_NVME_DGX_H100,
    ),
    # NVIDIA Ada GPU architecture whitepaper, appendix A (GeForce RTX 4090): FP16/BF16 tensor with FP32
    # accumulate 165.2 TFLOPS dense (330 only with FP16 accumulate, which PyTorch does not use), FP32
    # 82.6 TFLOPS, GDDR6X 1,008 GB/s, PCIe 4.0, no NVLink and no P2P on GeForce. nvidia-smi memory.total
    # 24564 MiB. Host: a 4-GPU workstation with 256 GB of DDR5 (2 x 4 channels at 4800 MT/s, ~60% achieved).
    # Collectives go through host memory over PCIe: nccl-tests reports ~10 GB/s bus bandwidth for 2 GPUs,
    # less as more GPUs share the root complex.
    "RTX4090": _gpu(
        "RTX4090",
        device_bytes=24564 * 2**20,
        host_bytes=256 * GiB // 4,
        bf16_peak=165.2e12,
        fp32_peak=82.6e12,
        hbm_bytes_per_s=1008e9,
        pcie=_PCIE4_ACHIEVED,
        collective={2: 10e9, 4: 7e9, 8: 5e9},
        host_adam=8 * 38.4e9 * 0.6 / 4 / _ADAM_BYTES_PER_ELEM,
        disk=_NVME_WORKSTATION,
    ),
    # A CPU-only server socket: 32 Zen 4 cores at ~3 GHz, AVX-512 on 2 x 256-bit pipes: 32 FP32 FLOP/cycle/core,
    # 3.1 TFLOPS peak, ~60% in oneDNN SGEMM; AVX512-BF16 doubles that for bfloat16; no fast float16 GEMM
    # (absent). 12 channels of DDR5-4800 (460 GB/s, ~60% achieved), 384 GB of RAM split between "device" and
    # "host" (the same RAM, see the module docstring). No collectives: one process.
    "CPU": lambda: Hardware(
        name="CPU",
        device_type="cpu",
        device_bytes=192 * GiB,
        host_bytes=192 * GiB,
        matmul_flops={"float32": 0.6 * 3.1e12, "bfloat16": 0.6 * 6.2e12},
        h2d_bytes_per_s=460e9 * 0.6 / 2,
        d2h_bytes_per_s=460e9 * 0.6 / 2,
        collective_bytes_per_s={},
        device_optim_elems_per_s=460e9 * 0.6 / _ADAM_BYTES_PER_ELEM,
        host_optim_elems_per_s=460e9 * 0.6 / _ADAM_BYTES_PER_ELEM,
        device_copy_bytes_per_s=460e9 * 0.6 / 2,
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# measurement


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    return "cpu"


def _local_ranks() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; else the world size, else 1)."""
    try:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    except (KeyError, ValueError):
        return comm.rank_and_world()[1]


def _cache_path(quick: bool) -> Path:
    """One cache file per machine, device, torch version, threads per process and number of ranks sharing the
    machine: everything that changes the measured rates. Ranks measure together, so on a CPU each sees its
    share of the cores (and on a GPU server its share of the host's bandwidth for the host AdamW rate); a
    process with one thread computes at about half the rate of one with two on two cores, and the host AdamW
    and copies too. A process that differs in any of them finds no cache and measures its own rates (a few
    seconds), rather than scaling another process's by a guessed factor."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()) or "host"
    ranks = _local_ranks()
    version = re.sub(r"[^A-Za-z0-9.]+", "-", torch.__version__)
    suffix = (f"-{ranks}ranks" if ranks > 1 else "") + ("-quick" if quick else "")
    return cache_dir() / (f"hardware-{host}-{_device_label(_device())}-torch{version}-"
                          f"{torch.get_num_threads()}threads{suffix}.json")


def _read_cache(path: Path) -> Hardware | None:
    """The cached calibration, or None when there is none. A cache is a file like any other (see [Note:
    untrusted files] in elixir/validation.py): damaged or of another format version, it is ignored with
    a one-line warning, and the machine is measured again (and the cache replaced)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        _ignore_cache(path, e.strerror or str(e))
        return None
    try:
        return Hardware.from_json(text, source=str(path))
    except ValueError as e:
        _ignore_cache(path, str(e).removeprefix(f"{path}: "))
        return None


def _ignore_cache(path: Path, reason: str) -> None:
    reason = " ".join(reason.split()).removesuffix("; measure again")  # one line, whatever the file held
    warnings.warn(f"ignoring the calibration cache {path}: {reason[:200]}; measuring again", stacklevel=3)


def _write_cache(path: Path, text: str) -> bool:
    """Write a cache file atomically (ranks on one machine write at once, and nobody may read half a file);
    a cache that cannot be written costs a measurement next time, never this run: a warning, and False."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
        return True
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot write the calibration cache {path} ({e.strerror or e}); the figures are used "
                      "but not cached (set ELIXIR_CACHE_DIR to a writable folder)", stacklevel=3)
        return False


def _seconds(fn: Callable[[], object], sync: Callable[[], None], *, min_total_s: float, max_reps: int = 50) -> float:
    """Shortest seconds of `fn` after one warm-up run, over runs repeated until `min_total_s` has passed (at
    least 3): the machine's rate, not its neighbours' load (these machines are shared and noisy)."""
    fn()
    sync()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_total_s and len(times) < max_reps):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return min(times)


def _matmul_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], sync, *, min_total_s: float,
                  slow_s: float, give_up_below: float = 0.0) -> float | None:
    """Best FLOP/s over the three GEMMs of a square Linear layer's training step (y = x w^T + b, dx = dy w,
    dw = dy^T x: transposed operands and fresh outputs, as autograd runs them) of growing size; growing stops
    before a size whose runs would take well over `slow_s`. None when the device cannot multiply in `dtype`,
    or does it below `give_up_below` (float16 GEMM on most CPUs is scalar code: the smallest size says so)."""
    best = 0.0
    for n in sizes:
        try:
            x, w, dy = (torch.randn(n, n, device=device).to(dtype) for _ in range(3))
            b = torch.randn(n, device=device).to(dtype)

            def linear(x=x, w=w, dy=dy, b=b):
                torch.addmm(b, x, w.t())
                torch.mm(dy, w)
                torch.mm(dy.t(), x)

            seconds = _seconds(linear, sync, min_total_s=min_total_s)
        except RuntimeError:
            return None
        best = max(best, 3 * 2 * n**3 / seconds)
        if best < give_up_below:
            return None
        if seconds * 8 > 4 * slow_s:  # the next size does 8x the work
            break
    return best or None


def _attention_flops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], sync, *,
                     min_total_s: float) -> float | None:
    """FLOP/s of a causal `scaled_dot_product_attention` forward and backward of (batch, heads, tokens, head
    size) `shape`, by torch.utils.flop_counter's formulas (those the profile counts); None if it cannot run."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    try:
        q, k, v = (torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, device=device).to(dtype)

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        seconds = _seconds(step, sync, min_total_s=min_total_s)
    except RuntimeError:
        return None
    return (sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)) / seconds


def _op_overhead_s(device: torch.device, sync, min_total_s: float) -> float:
    """Seconds per operator of a training step's forward and backward, beyond the kernels: a tiny transformer
    (2 blocks of width 32, 16 tokens), whose kernels take next to nothing, timed whole and divided by the
    operators the profiler counts in it. The per-operator cost of eager PyTorch in this process, with the
    Python of module calls around it."""
    from elixir.profile import profile

    model, batch = _tiny_transformer(device)
    ops = len(profile(model, batch).ops)

    def step():
        model(**batch).loss.backward()
        for p in model.parameters():
            p.grad = None

    return _seconds(step, sync, min_total_s=min_total_s) / ops


def _tiny_transformer(device: torch.device, n_layer: int = 2):
    """(model, batch) of a transformer so small that its kernels take next to nothing: what remains of its
    step is the cost of running operators at all."""
    from elixir.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = GPT(cfg).to(device).train()
        x = torch.randint(0, cfg.vocab_size, (1, cfg.block_size), device=device)
    return model, {"input_ids": x, "labels": x}


def _runtime_overheads(device: torch.device, sync, min_total_s: float) -> tuple[float, float]:
    """(seconds per operator of parameter interception, seconds per chunk fetch of the runtime's own work):
    a tiny transformer wrapped three ways, all resident, one on-demand chunk that stays in the cache (every
    use intercepted, nothing fetched in a step) and many small on-demand chunks through a small cache."""
    import copy

    from elixir.plan import Plan
    from elixir.profile import profile
    from elixir.runtime.wrap import memory_stats, wrap

    base, batch = _tiny_transformer(device, n_layer=4)
    ops = len(profile(base, batch).ops)
    chunk_mib = sum(p.numel() for p in base.parameters()) * 4 / 2**20
    largest_mib = max(p.numel() for p in base.parameters()) * 4 / 2**20

    def timed(**plan_kw) -> tuple[float, float]:
        model = copy.deepcopy(base)
        optim = torch.optim.SGD(model.parameters(), lr=0.0)
        model, optim = wrap(model, optim, plan=Plan.uniform(model, optimizer=optim, **plan_kw), device=device)

        def step():
            model(**batch).loss.backward()
            optim.zero_grad()

        step()
        before = memory_stats(model)["gathers"]
        step()
        fetches = memory_stats(model)["gathers"] - before
        seconds = _seconds(step, sync, min_total_s=min_total_s)
        return seconds, fetches

    resident, _ = timed(chunk_mib=2 * chunk_mib, resident=True)
    cached, cached_fetches = timed(chunk_mib=2 * chunk_mib, resident=False, cache_blocks=2)
    small, small_fetches = timed(chunk_mib=largest_mib, resident=False, cache_blocks=4)
    per_fetch = max(0.0, (small - cached) / max(small_fetches - cached_fetches, 1))
    per_op = max(0.0, (cached - resident - cached_fetches * per_fetch) / ops)
    return per_op, per_fetch


def _eager_bytes_per_s(device: torch.device, sync, min_total_s: float, op_overhead_s: float, *, numel: int) -> float:
    """Bytes per second of memory-bound operators, as the profile counts them (see [Note: what a memory-bound
    operator costs] in elixir/profile/trace.py): the forward and backward of a transformer block's operators
    without matmuls (layer norm, GELU, a residual add, softmax, a concatenation, a sum) on `numel`-element
    activations, less the per-operator overhead."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from elixir.profile.trace import moved_bytes

    width = 256
    x = torch.randn(numel // width, width, device=device, requires_grad=True)
    w = torch.ones(width, device=device, requires_grad=True)
    b = torch.zeros(width, device=device, requires_grad=True)

    def step():
        y = F.layer_norm(x, (width,), w, b)
        y = F.gelu(y) + x
        z = torch.softmax(y, dim=-1)
        torch.cat([z, y], dim=-1).mul(0.5).sum().backward()
        x.grad = w.grad = b.grad = None

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops += 1
            self.bytes += moved_bytes(func, args, kwargs or {}, out)
            return out

    with Count() as count:
        step()
    seconds = _seconds(step, sync, min_total_s=min_total_s)
    return count.bytes / max(seconds - count.ops * op_overhead_s, seconds / 4)


def _adamw_elems_per_s(device: torch.device, numel: int, sync, min_total_s: float) -> float:
    param = torch.zeros(numel, device=device, requires_grad=True)
    param.grad = torch.randn(numel, device=device)
    try:
        optim = torch.optim.AdamW([param], lr=1e-3, fused=True)
        optim.step()
    except RuntimeError:  # no fused kernel for this device: the default implementation
        optim = torch.optim.AdamW([param], lr=1e-3)
    return numel / _seconds(optim.step, sync, min_total_s=min_total_s)


def _copy_bytes_per_s(dst: torch.Tensor, src: torch.Tensor, sync, min_total_s: float) -> float:
    non_blocking = dst.is_cuda != src.is_cuda
    return src.numel() * src.element_size() / _seconds(
        lambda: dst.copy_(src, non_blocking=non_blocking), sync, min_total_s=min_total_s
    )


def _collective_bytes_per_s(device: torch.device, numel: int, sync, min_total_s: float) -> dict[int, float]:
    import torch.distributed as dist

    if comm.rank_and_world()[1] < 2:
        return {}
    from elixir.comm import all_gather, reduce_scatter_mean
    from elixir.memory.chunk import ChunkGroup
    from elixir.shm import SharedArena

    world, rank = dist.get_world_size(), dist.get_rank()
    group = ChunkGroup(dist.group.WORLD, rank, world)
    numel -= numel % world
    # the buffers the runtime communicates from: in shared memory where ranks share a host (elixir/shm.py)
    arena = SharedArena.create(group) if device.type == "cpu" else None
    full = arena.empty(numel, torch.float32) if arena is not None else torch.zeros(numel, device=device)
    n = numel // world
    own = full[rank * n : (rank + 1) * n]
    shard = torch.zeros(n, device=device)
    nbytes = full.numel() * full.element_size()
    gather = _seconds(lambda: all_gather(full, own, group, arena=arena), sync, min_total_s=min_total_s)
    scatter = _seconds(lambda: reduce_scatter_mean(shard, full, group, arena=arena), sync, min_total_s=min_total_s)
    # Ranks time slightly different runs; the slowest decides a collective's time.
    slowest = torch.tensor([gather, scatter], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    bus = (world - 1) / world * nbytes
    return {world: bus / float(slowest.max())}


def _disk_bytes_per_s(folder: str, nbytes: int) -> tuple[float, float]:
    """Write then read `nbytes` in 8 MiB blocks of a temporary file with O_DIRECT (buffered where the
    filesystem refuses it, then the page cache flatters the read); best of two passes each."""
    import mmap
    import tempfile

    block = 8 * 2**20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    fd_tmp, name = tempfile.mkstemp(prefix="elixir-disk-measure-", dir=folder)
    os.close(fd_tmp)
    try:
        try:
            fd = os.open(name, os.O_RDWR | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(name, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            times = {"write": [], "read": []}
            for _ in range(2):
                started = time.perf_counter()
                for off in range(0, nbytes, block):
                    os.pwrite(fd, buf, off)
                os.fdatasync(fd)
                times["write"].append(time.perf_counter() - started)
                started = time.perf_counter()
                for off in range(0, nbytes, block):
                    os.preadv(fd, [buf], off)
                times["read"].append(time.perf_counter() - started)
        finally:
            os.close(fd)
    finally:
        os.unlink(name)
    return nbytes / min(times["read"]), nbytes / min(times["write"])


def _memory_bytes(device: torch.device) -> tuple[int, int]:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, ram // max(1, torch.cuda.device_count())
    return ram // 2, ram // 2


def _measure(quick: bool) -> Hardware:
    device = _device()
    on_gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    min_total_s = 0.05 if quick else 0.5
    slow_s = 0.05 if quick else 0.25
    mib = 2**20
    # Copies and AdamW on buffers well beyond the last-level cache (a GPU's L2 is 40-50 MiB, a server CPU's L3
    # up to a few hundred), as the shards of a model are: in-cache figures would flatter both.
    if on_gpu:
        sizes, copy_bytes, adam_numel = ((1024, 2048) if quick else (2048, 4096, 8192)), 256 * mib, 2**24
        attention = (4, 16, 1024, 128) if quick else (8, 16, 2048, 128)
    else:
        sizes, copy_bytes, adam_numel = ((256, 512) if quick else (256, 512, 1024)), 64 * mib, 2**23
        attention = (2, 8, 256, 64) if quick else (4, 8, 512, 64)
    if quick:
        copy_bytes, adam_numel = copy_bytes // 4, adam_numel // 4

    matmul: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if on_gpu and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        # A CPU without AVX512-FP16/AMX runs float16 GEMM as scalar code, ~50x slower: not a real option.
        give_up_below = 0.25 * max(matmul.values(), default=0.0) if dtype == torch.float16 and not on_gpu else 0.0
        rate = _matmul_flops(
            device, dtype, sizes, sync, min_total_s=min_total_s, slow_s=slow_s, give_up_below=give_up_below
        )
        if rate is not None:
            matmul[str(dtype).removeprefix("torch.")] = rate
    attention_flops: dict[str, float] = {}
    for name in matmul:
        # a dtype whose GEMMs run at under a quarter of the best (bf16 on a CPU without AMX or AVX512-BF16) is
        # timed on a smaller shape: a few repetitions of the full one would take seconds, for a rate no plan uses
        slow = matmul[name] < max(matmul.values()) / 4
        shape = (attention[0] // 2, attention[1], attention[2] // 2, attention[3]) if slow else attention
        rate = _attention_flops(device, getattr(torch, name), shape, sync, min_total_s=min_total_s)
        if rate is not None:
            attention_flops[name] = rate

    numel = copy_bytes // 4
    # Distinct buffers for the two sides, also on a CPU-only machine where both are RAM; pinned staging on a
    # GPU (only this one buffer, freed on return).
    host = torch.ones(numel, pin_memory=on_gpu)
    on_device = torch.ones(numel, device=device)
    other_on_device = torch.ones(numel, device=device)
    h2d = _copy_bytes_per_s(on_device, host, sync, min_total_s)
    d2h = _copy_bytes_per_s(host, on_device, sync, min_total_s)
    device_copy = _copy_bytes_per_s(other_on_device, on_device, sync, min_total_s)
    del host, on_device, other_on_device

    # steps of milliseconds: a fifth of the time gives tens of repetitions, enough for their minimum
    op_overhead = _op_overhead_s(device, sync, min_total_s / 5)
    interception, fetch_overhead = _runtime_overheads(device, sync, min_total_s / 5)
    eager = _eager_bytes_per_s(device, sync, min_total_s / 5, op_overhead, numel=(2**18 if quick else 2**20) * (
        16 if on_gpu else 1))

    device_optim = _adamw_elems_per_s(device, adam_numel, sync, min_total_s)
    host_optim = _adamw_elems_per_s(torch.device("cpu"), adam_numel if not on_gpu else adam_numel // 8,
                                    lambda: None, min_total_s)
    device_bytes, host_bytes = _memory_bytes(device)
    return Hardware(
        name=f"measured: {_device_label(device)}",
        device_type=device.type,
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        matmul_flops=matmul,
        h2d_bytes_per_s=h2d,
        d2h_bytes_per_s=d2h,
        collective_bytes_per_s=_collective_bytes_per_s(device, numel, sync, min_total_s),
        device_optim_elems_per_s=device_optim,
        host_optim_elems_per_s=host_optim,
        device_copy_bytes_per_s=device_copy,
        attention_flops=attention_flops,
        op_overhead_s=op_overhead,
        eager_bytes_per_s=eager,
        interception_op_s=interception,
        fetch_overhead_s=fetch_overhead,
    )
