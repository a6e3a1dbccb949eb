"""Which machine this process runs on: its device, the device's name, and the ranks of the job on it.

What both the calibration (elixir/hardware/measure.py) and the name of its cache file
(elixir/hardware/cache.py) depend on.
"""

from __future__ import annotations

import os
import re

import torch

from elixir import comm


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


def _nodes() -> int:
    """Nodes the job runs on (`comm.launched_nodes`)."""
    return comm.launched_nodes()


def _cores() -> int:
    """Cores this process may run on (its affinity mask; else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _spare_cores() -> float:
    """Cores per rank that no compute thread of the job's ranks on this machine uses (`Hardware.spare_cores`)."""
    ranks = _local_ranks()
    return max(0.0, (_cores() - ranks * torch.get_num_threads()) / ranks)
