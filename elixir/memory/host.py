"""Host memory a training process keeps: glibc's malloc told to reuse freed blocks instead of returning them."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# [Note: freed host memory is kept]
# A training step allocates the same tensors step after step: activations, their gradients, logits, gradient buffers
# on their way to the host. glibc's malloc serves a large block (above its mmap threshold, 128 KiB to 32 MiB as it
# adapts) with a fresh mmap and unmaps it when freed, and returns the free top of its heap to the kernel
# (`M_TRIM_THRESHOLD`). The next step's tensor of the same size then touches fresh pages: one page fault for every 4
# KiB, each zeroed by the kernel. On the 2-core VM of BENCHMARKS.md OPT's 4 MiB logits, their log-softmax and its
# gradient took 1,024 faults and ~9 ms each, where the same kernels on reused memory take 0.2-0.4 ms; a wrapped OPT
# step with host chunks took 1,500-4,400 faults, and ran faster without them in 6 of 6 pairs of processes, by 3% at
# the median and up to 17% (bench/bench_malloc.py). How many faults a step takes depends on the allocator's state, so
# the same step also varied from run to run. Elixir's cost model charges kernels, not faults.
#
# So `wrap` and `Hardware.measure` set glibc's mmap threshold to 1 GiB (32 MiB where an older glibc refuses more) and
# its trim threshold to the largest value mallopt accepts: freed blocks stay in the process for the next step. It is
# not perfect: a freed block wedged between blocks in use can be a little too small for the next request of its size
# (PyTorch asks for 64-byte-aligned blocks, which glibc serves with some slack), and that step then takes fresh pages.
# In a loop of a wrapped MLP with 8 MiB activations most steps took no fault, against 2,000-6,000 in nearly every step
# with glibc's defaults. PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) goes further for the same reason:
# by default it preloads tcmalloc (or jemalloc) in place of glibc's malloc. The cost: memory freed once is not given
# back to the system while the process lives (the peak of a step stays resident between steps).
# `ELIXIR_KEEP_HOST_MEMORY=0` leaves malloc as it is, and so does a process started with glibc's own
# `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` (the user chose). Another C library or allocator: nothing is
# changed.

_applied: bool | None = None


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see [Note: freed host memory is kept]), once per
    process; whether it is in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("ELIXIR_KEEP_HOST_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # older glibc refuses a threshold above half its heap size (32 MiB on 64-bit): then that
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, 2**30) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
    trim_ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return mmap_ok and trim_ok
