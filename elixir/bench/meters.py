"""Memory meters: bytes in use now and at peak, by the CUDA allocator or the process's resident set."""

from __future__ import annotations

import torch


class MemoryMeter:
    """Bytes in use now, and at peak since `reset_peak`, by one counter:
    "cuda": torch.cuda.memory_allocated / max_memory_allocated of the current device;
    "rss": the process's resident set (Linux /proc/self/status VmRSS; the peak VmHWM, reset by writing 5
    to /proc/self/clear_refs). RSS counts what malloc holds, not what is live; `now` and `reset_peak` first
    hand malloc's free pages back (glibc malloc_trim), so that a delta counts memory put to use, not pages
    that an earlier system freed and this one reuses."""

    def __init__(self, kind: str) -> None:
        if kind not in ("cuda", "rss"):
            raise ValueError(f"MemoryMeter kind {kind!r}: use 'cuda' or 'rss'")
        self.kind = kind
        self._resettable = kind == "cuda"
        self._floor = 0
        if kind == "rss":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._resettable = True
            except OSError:
                pass

    @property
    def source(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.kind == "cuda" else "RSS"

    def now(self) -> int:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        _malloc_trim()
        return _proc_status("VmRSS")

    def reset_peak(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        _malloc_trim()
        if self._resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._floor = self.now()

    def peak(self) -> int:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._resettable:
            return _proc_status("VmHWM")
        return max(self._floor, self.now())  # no resettable peak: what is in use after the steps


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC = None


def _proc_status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def meters_for(device: torch.device) -> dict[str, MemoryMeter]:
    """{"device": ..., "host": ...} on a GPU; {"ram": RSS} on a CPU-only machine (device and host are the
    same memory there)."""
    if device.type == "cuda":
        return {"device": MemoryMeter("cuda"), "host": MemoryMeter("rss")}
    return {"ram": MemoryMeter("rss")}
