"""Device-specific code in one place: which device, pinned host memory, the copy stream, synchronisation.

[Note: copies beside compute]
On CUDA the shards that live on the host are pinned, so host<->device copies are asynchronous, and a
prefetch runs its host-to-device copy and its all-gather on a side stream (`copy_stream`): they
overlap the kernels of the compute stream. The first use waits on the device, not on the host
(`StreamPending.wait`): the compute stream waits for the copy stream's event and the collective.
The host itself waits (`synchronize`) only where it reads or writes memory that an asynchronous copy
may still touch: before the optimizer updates host states at the end of backward, and when the
runtime finishes a step's pending work. On the CPU there is no stream and nothing is pinned
(pinning on a CPU-only machine fails or wastes memory): every copy is synchronous, and this module
returns None or does nothing, so the rest of the runtime runs the same code on both.

[Note: casts beside the copy]
A parameter shard that is derived from its fp32 master (it is not stored: see [Note: host bytes per
parameter] in runtime/wrap.py), and an updated master written into a device shard, cross between host
and device *and* change dtype. Asked to do both in one `copy_`, torch casts on the host into a fresh,
unpinned tensor and copies from there: an allocation and a synchronous copy every time. `copy_cast_`
instead moves the source bytes into a preallocated device staging buffer and casts there (host ->
device), or casts into the staging buffer and moves the result (device -> host). On the CPU the cast
is the copy.
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """ValueError when the device cannot compute in `dtype`."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"compute_dtype=bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
            "use compute_dtype=float16 (with loss scaling) or float32"
        )


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy between tiers; asynchronous on CUDA when the host side is pinned."""
    return dst.copy_(src, non_blocking=dst.is_cuda or src.is_cuda)


def copy_cast_(dst: torch.Tensor, src: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
    """Copy `src` into `dst`, between tiers and dtypes alike (see [Note: casts beside the copy]).

    `staging`: device memory used only by copies issued on one stream (stream order makes its reuse safe);
    needed where a copy crosses between the host and a GPU and changes dtype. A buffer smaller than the
    crossing bytes carries them a tile at a time (a tile's cast starts once the copy of the one before it
    is done)."""
    if dst.dtype == src.dtype or dst.device == src.device:
        return copy_(dst, src)
    assert staging is not None, "a cast across host and device needs a staging buffer"
    # the bytes cross in the host side's dtype; the cast runs on the device
    through_tiles(dst, src, staging, src.dtype if dst.is_cuda else dst.dtype)
    return dst


def through_tiles(dst: torch.Tensor, src: torch.Tensor, staging: torch.Tensor, dtype: torch.dtype) -> None:
    """Copy `src` into `dst` through `staging` viewed as `dtype`, as many elements at a time as it holds: each
    tile copied in (cast when `dtype` is not `src`'s), then out (cast when it is not `dst`'s); asynchronous
    where a copy crosses between the host and a GPU."""
    flat = staging.view(-1).view(torch.uint8)
    capacity = flat.numel() // dtype.itemsize
    assert capacity > 0, "staging buffer too small"
    stage = flat[: capacity * dtype.itemsize].view(dtype)
    src, dst = (t if t.dim() == 1 else t.view(-1) for t in (src, dst))  # flat shards, or views of them
    for start in range(0, src.numel(), capacity):
        tile = stage[: min(capacity, src.numel() - start)]
        end = start + tile.numel()
        tile.copy_(src[start:end], non_blocking=src.device != tile.device)
        dst[start:end].copy_(tile, non_blocking=dst.device != tile.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_host(device: torch.device) -> bool:
    """Whether host buffers that copies read or write are pinned (CUDA only)."""
    return device.type == "cuda"


_copy_streams: dict[torch.device, object] = {}


def copy_stream(device: torch.device):
    """The side stream of prefetch copies and gathers on `device`; None on the CPU."""
    if device.type != "cuda":
        return None
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


class StreamPending:
    """A prefetch issued on the copy stream: `wait()` makes the current stream wait for it."""

    __slots__ = ("event", "collective", "device")

    def __init__(self, stream, collective, device: torch.device) -> None:
        self.event = torch.cuda.Event()
        self.event.record(stream)
        self.collective = collective
        self.device = device

    def wait(self) -> None:
        if self.collective is not None:
            self.collective.wait()  # NCCL: the current stream waits for the collective's stream
        torch.cuda.current_stream(self.device).wait_event(self.event)
