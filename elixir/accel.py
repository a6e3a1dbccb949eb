"""Device-specific code in one place: which device, host staging, synchronisation.

On CUDA, host<->device copies can be asynchronous from pinned staging memory; on the CPU every copy
is synchronous and there is nothing to pin (pinning on a CPU-only machine fails or wastes memory).
Everything else in the runtime is device-agnostic and calls these few functions.
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
