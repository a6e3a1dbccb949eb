"""What a training run reports: a metrics record every `--log-every` steps (a JSONL file in `--out`,
TensorBoard and wandb when asked), the progress display, and the numbers the records hold.

A record's throughput figures recompute from its own fields: `tokens_per_s = tokens_per_step *
window_steps / window_s`, `tflops = flops_per_step * window_steps / window_s / 1e12` (per rank: the
profiler's FLOPs of one micro-batch on one rank, times the micro-batches of a step) and `mfu = tflops *
1e12 / peak_flops` (the hardware's matmul rate in the compute dtype, measured or from its preset).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import TextIO

import torch


def host_rss_bytes() -> int:
    """This process's resident memory now (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak_kib * (1 if sys.platform == "darwin" else 1024)


def memory_fields(model: torch.nn.Module, device: torch.device) -> dict:
    """Model data as Elixir counts it, per tier, now and at peak; the allocator's peaks on CUDA; host RSS."""
    import elixir

    stats = elixir.memory_stats(model)
    out = {k: int(stats.get(k, 0)) for k in ("device_bytes", "device_bytes_peak", "host_bytes", "host_bytes_peak",
                                             "disk_bytes")}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    out["host_rss_bytes"] = host_rss_bytes()
    return out


class Reporters:
    """Where records go besides the screen: `DIR/metrics.jsonl` (always, with `--out`), TensorBoard,
    wandb. Only rank 0 reports."""

    def __init__(self, *, out_dir: str | None, report_to: tuple[str, ...], config: dict, enabled: bool) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "metrics.jsonl")
            self.jsonl = open(path, "a")  # a resumed run goes on appending
            if self.jsonl.tell() and not _ends_a_line(path):
                self.jsonl.write("\n")  # a run killed mid-record left half a line: the next record starts afresh
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--report-to tensorboard needs: pip install 'elixir-train[track]'") from None
            assert out_dir is not None  # check_args asks for --out
            self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ValueError("--report-to wandb needs wandb: pip install 'elixir-train[track]'") from None
            # WANDB_MODE=offline (or disabled) runs without an account or network; wandb reads it itself
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "elixir"), config=config, dir=out_dir)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(record: dict, total: int) -> str:
    """A record as one progress line."""
    width = len(str(total))
    mib = 2**20
    line = (
        f"step {record['step']:>{width}}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        + (f"gnorm {record['grad_norm']:.3g} | " if record.get("grad_norm") is not None else "")
        + f"{record['tokens_per_s']:,.0f} tok/s | {record['tflops']:.3g} TFLOPS"
        + (f" MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "")
        + (f" | chunk wait {100 * record['chunk_wait_s'] / record['step_s']:.0f}%"
           if record.get("chunk_wait_s") is not None and record.get("step_s") else "")
        + f" | device {record['device_bytes'] / mib:.1f}/{record['device_bytes_peak'] / mib:.1f} MiB | host "
        f"{record['host_bytes'] / mib:.1f}/{record['host_bytes_peak'] / mib:.1f} MiB | {clock(record['elapsed_s'])}"
    )
    return line


class Progress:
    """The progress display: one line redrawn in place (`\\r`) on a terminal, refreshed at most
    `refresh_s` apart; otherwise one line per metrics record, so logs stay readable."""

    def __init__(self, total: int, out: TextIO, *, enabled: bool, refresh_s: float = 0.2) -> None:
        self.total = total
        self.out = out
        self.enabled = enabled
        self.refresh_s = refresh_s
        self.tty = enabled and out.isatty()
        self._bar_width = 0  # characters of the bar now on screen, 0 when none
        self._last_draw = -math.inf
        self._last_text = ""

    def record(self, record: dict) -> None:
        """A metrics record: a line of its own, or the bar's new text on a terminal."""
        if not self.enabled:
            return
        text = step_line(record, self.total)
        if not self.tty:
            print(text, file=self.out, flush=True)
            return
        self._last_text = text.split(" | ", 1)[1]
        self._draw(record["step"])

    def tick(self, step: int) -> None:
        """A step done: redraw the bar on a terminal (with the last record's figures) when due."""
        if self.tty and (time.perf_counter() - self._last_draw >= self.refresh_s or step == self.total):
            self._draw(step)

    def _draw(self, step: int) -> None:
        filled = round(10 * step / self.total)
        # A line wider than the terminal wraps, and `\r` then redraws only its last part.
        columns = shutil.get_terminal_size().columns
        width = len(str(self.total))
        text = f"[{'#' * filled}{'.' * (10 - filled)}] step {step:>{width}}/{self.total}"
        text = (text + (" | " + self._last_text if self._last_text else ""))[: max(20, columns - 1)]
        self.out.write("\r" + text.ljust(self._bar_width))
        self.out.flush()
        self._bar_width = len(text)
        self._last_draw = time.perf_counter()
        if step == self.total:
            self._end_bar()

    def line(self, text: str) -> None:
        """A line of its own, printed above the bar."""
        if not self.enabled:
            return
        if self._bar_width:
            # Keep the bar's last state on screen and continue below it.
            self._end_bar()
        print(text, file=self.out, flush=True)

    def _end_bar(self) -> None:
        self.out.write("\n")
        self.out.flush()
        self._bar_width = 0


def _ends_a_line(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
