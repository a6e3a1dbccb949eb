"""Byte counters per memory tier (device, host), with peaks.

Every buffer of model data that Elixir allocates is counted here when it is allocated and when it is
released, so that `elixir.memory_stats` reports what the library holds, not what the allocator holds.
On a CPU-only machine device and host are the same RAM, but the counters stay separate. The disk tier
counts the scratch file (elixir/memory/disk.py); its buffers in host memory count as host.
"""

from __future__ import annotations

import torch

TIERS = ("device", "host", "disk")


class MemoryTracker:
    """Current and peak bytes per tier, and allocation through `empty`/`release`."""

    def __init__(self, device: torch.device, host: torch.device | None = None) -> None:
        self.devices = {"device": torch.device(device), "host": torch.device(host or "cpu")}
        self.bytes = dict.fromkeys(TIERS, 0)
        self.bytes_peak = dict.fromkeys(TIERS, 0)
        # a SharedArena (elixir/shm.py) when the ranks of the model's group share a host
        self.shared = None
        self.allocations = 0  # buffers allocated so far: constant over a training step in steady state
        self.pinned_allocations = 0  # of which page-locked host memory (CUDA only)

    def empty(
        self, numel: int, dtype: torch.dtype, tier: str, *, zero: bool = False, pin: bool = False,
        share: bool = False,
    ) -> torch.Tensor:
        """A counted buffer; `pin`: page-locked host memory, when the device is a GPU (see accel.py);
        `share`: a communication buffer the peers read, in shared memory when there is an arena
        (a shared buffer starts zero-filled)."""
        self.allocations += 1
        if share and self.shared is not None and tier == "device":
            t = self.shared.empty(numel, dtype)
            self.count(tier, t.numel() * t.element_size())
            return t
        make = torch.zeros if zero else torch.empty
        pin = pin and tier == "host" and self.devices["device"].type == "cuda"
        self.pinned_allocations += pin
        t = make(numel, dtype=dtype, device=self.devices[tier], pin_memory=pin)
        self.count(tier, t.numel() * t.element_size())
        return t

    def release(self, t: torch.Tensor | None, tier: str) -> None:
        if t is not None:
            self.count(tier, -t.numel() * t.element_size())

    def count(self, tier: str, nbytes: int) -> None:
        self.bytes[tier] += nbytes
        assert self.bytes[tier] >= 0, f"{tier} byte counter went negative"
        if self.bytes[tier] > self.bytes_peak[tier]:
            self.bytes_peak[tier] = self.bytes[tier]

    def reset_peak(self) -> None:
        self.bytes_peak = dict(self.bytes)
