"""The search: the fastest plan that fits both memories, by the cost model.

Per chunk size (from the largest parameter up to 256 MiB), the search walks four levels of
placement, each moving more model data off the device, and within a level moves as few chunks as
needed (memory falls monotonically with the count, time grows):
  L0 every chunk resident, optimizer on the device;
  L1 the optimizer (fp32 master, gradient shard, states) of k chunks on the host;
  L2 every optimizer on the host, k chunks gathered on demand (their shards on the device);
  L3 every chunk on demand, the shards of k chunks on the host;
  L4 when even L3 overflows the host: all shards on the host, the optimizer of k chunks back on the device;
with a few cache sizes for levels that use the cache. Every candidate is simulated; the fastest
that fits wins. Nothing is allocated: a candidate is a Plan and a replay of the profile.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from elixir.hardware import Hardware
from elixir.plan import DTYPES, ChunkPlan, Plan, dtype_name, pack_chunks
from elixir.profile import Profile
from elixir.search.cost import Prediction, simulate

# share of each memory the plan may fill: the CUDA context, allocator slack and fragmentation,
# and everything that is not model data or activations take the rest
DEVICE_MARGIN = 0.9
HOST_MARGIN = 0.85
_MIB = 2**20


class PlanDoesNotFitError(ValueError):
    """No plan fits the memories at hand."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _chunk_sizes(largest: int, itemsize: int) -> list[int]:
    sizes = {largest}
    for mib in (8, 32, 64, 128, 256):
        numel = mib * _MIB // itemsize
        if numel >= largest:
            sizes.add(numel)
    return sorted(sizes)


def _ops_chunks(profile: Profile, chunk_of: dict[str, int]) -> int:
    """Most distinct chunks one operator reads: the cache must hold them together."""
    most = 1
    for op in profile.ops:
        most = max(most, len({chunk_of[n] for n in op.params if n in chunk_of}))
    return most


def search(
    profile: Profile,
    hardware: Hardware,
    *,
    world_size: int = 1,
    compute_dtype="float32",
    prefetch_depth: int = 2,
    group_sizes: dict[str, int] | None = None,
) -> tuple[Plan, Prediction]:
    """The fastest plan that fits `hardware`'s device and host memory, and its prediction.

    `group_sizes`: parameters sharded over fewer ranks than the world (expert parallel), as
    `Plan.group_sizes`; they are packed into chunks of their own."""
    group_sizes = dict(group_sizes or {})
    dtype_key = dtype_name(compute_dtype)
    itemsize = DTYPES[dtype_key].itemsize
    device_budget = int(hardware.device_bytes * DEVICE_MARGIN)
    host_budget = int(hardware.host_bytes * HOST_MARGIN)
    order = profile.param_order()
    named = [(n, SimpleNamespace(numel=lambda v=profile.param_numels[n]: v)) for n in order]
    group_of = {id(p): group_sizes.get(n, world_size) for n, p in named}  # chunks never mix groups
    largest = max(profile.param_numels.values())
    best: tuple[Plan, Prediction] | None = None
    smallest: tuple[Plan, Prediction] | None = None  # the least device memory seen, for the error

    def consider(plan: Plan) -> Prediction:
        nonlocal best, smallest
        pred = simulate(profile, plan, hardware)
        if smallest is None or (pred.device_bytes_peak, pred.host_bytes_peak) < (
            smallest[1].device_bytes_peak,
            smallest[1].host_bytes_peak,
        ):
            smallest = (plan, pred)
        if pred.device_bytes_peak <= device_budget and pred.host_bytes_peak <= host_budget:
            if best is None or pred.step_s < best[1].step_s:
                best = (plan, pred)
        return pred

    def fits(pred: Prediction) -> bool:
        return pred.device_bytes_peak <= device_budget and pred.host_bytes_peak <= host_budget

    for chunk_numel in _chunk_sizes(largest, itemsize):
        names = [tuple(c) for c in pack_chunks(named, group_of, chunk_numel, itemsize)]
        chunk_of = {n: i for i, c in enumerate(names) for n in c}
        min_blocks = min(len(names), _ops_chunks(profile, chunk_of) + 1)
        base = Plan(
            chunks=tuple(ChunkPlan(params=c, resident=True) for c in names),
            chunk_numel=chunk_numel,
            cache_blocks=0,
            prefetch_depth=prefetch_depth,
            compute_dtype=dtype_key,
            world_size=world_size,
            param_shapes=dict(profile.param_shapes),
            group_sizes=group_sizes,
        )

        def level(k: int, lvl: int, blocks: int, names=names, base=base) -> Plan:
            chunks = []
            for i, c in enumerate(names):
                moved = i < k
                if lvl == 1:
                    choice = dict(resident=True, param_home="device", optim_home="host" if moved else "device")
                elif lvl == 2:
                    choice = dict(resident=not moved, param_home="device", optim_home="host")
                elif lvl == 3:
                    choice = dict(resident=False, param_home="host" if moved else "device", optim_home="host")
                else:  # every shard on the host, the optimizer of k chunks back on the device
                    choice = dict(resident=False, param_home="host", optim_home="device" if moved else "host")
                chunks.append(ChunkPlan(params=c, **choice))
            uses_cache = any(not c.resident for c in chunks)
            return dataclasses.replace(base, chunks=tuple(chunks), cache_blocks=blocks if uses_cache else 0)

        if fits(consider(base)):
            continue  # all resident fits: nothing slower at this chunk size can win on memory
        for lvl in (1, 2, 3):
            block_options = [0] if lvl == 1 else sorted({min_blocks, min_blocks + 2, 2 * min_blocks + 2})
            for blocks in block_options:
                blocks = min(blocks, len(names)) if lvl > 1 else 0
                # smallest k that fits: memory falls monotonically with k
                lo, hi = 1, len(names)
                if not fits(consider(level(hi, lvl, blocks))):
                    continue
                while lo < hi:
                    mid = (lo + hi) // 2
                    if fits(consider(level(mid, lvl, blocks))):
                        hi = mid
                    else:
                        lo = mid + 1
                consider(level(lo, lvl, blocks))
            if best is not None and best[0].chunk_numel == chunk_numel:
                break  # a cheaper level already fits at this chunk size
        else:
            # L4: when the host is what overflows, give the device's spare room to optimizer states:
            # the largest k whose device memory still fits (device memory grows with k, host falls)
            for blocks in sorted({min_blocks, min_blocks + 2}):
                blocks = min(blocks, len(names))
                lo, hi = 0, len(names)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if consider(level(mid, 4, blocks)).device_bytes_peak <= device_budget:
                        lo = mid
                    else:
                        hi = mid - 1
                consider(level(lo, 4, blocks))
    if best is None:
        raise _infeasible(smallest, device_budget, host_budget, world_size)
    return best


def _infeasible(smallest, device_budget: int, host_budget: int, world_size: int) -> PlanDoesNotFitError:
    plan, pred = smallest
    lines = [
        "no plan fits: with every chunk gathered on demand and everything possible on the host, a step needs "
        f"{_gib(pred.device_bytes_peak)} of device memory (of {_gib(device_budget)} usable) and "
        f"{_gib(pred.host_bytes_peak)} of host memory per rank (of {_gib(host_budget)} usable)."
    ]
    fixes = []
    if pred.host_bytes_peak > host_budget:
        ranks = -(-pred.host_bytes_peak * world_size // host_budget)
        fixes.append(f"more host memory: at least {_gib(pred.host_bytes_peak / HOST_MARGIN)} per rank")
        fixes.append(f"more GPUs: about {ranks} ranks shard the model data so that it fits")
    if pred.device_bytes_peak > device_budget:
        over = pred.device_bytes_peak - device_budget
        if pred.activation_bytes >= over:
            fixes.append(
                f"a smaller batch or activation checkpointing: activations take {_gib(pred.activation_bytes)}, "
                f"{_gib(over)} too much"
            )
        else:
            fixes.append(f"a device with at least {_gib(pred.device_bytes_peak / DEVICE_MARGIN)}")
    lines.append("Smallest changes that would fit: " + "; ".join(fixes) + ".")
    return PlanDoesNotFitError(" ".join(lines))
