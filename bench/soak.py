"""Soak: a long `elixir train` run must keep its memory flat: after warm-up, Elixir's counters (device and host
bytes, gradient buffers, the block cache), the process's resident memory, open file descriptors and threads do
not grow, through training steps, evaluations and checkpoints.

    python bench/soak.py --job default --steps 2000                       # the default job, one process
    torchrun --nproc-per-node 2 bench/soak.py --job host --steps 2000     # 2 ranks, on-demand chunks on the host
    python bench/soak.py ... --json soak.json

Each rank samples every --sample-every steps and prints, on rank 0, the range of each quantity after warm-up
(the first --warmup steps) and the resident memory's trend (least squares, MiB per 1000 steps). It exits 1
when a counter, the descriptors or the threads moved, or resident memory grew by more than --rss-growth-mib
from the first sample after warm-up to the last (a leak of even one small chunk per step is tens of MiB
over a few hundred steps). tests/test_soak.py runs it for a few hundred steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import threading

JOBS = {
    # `elixir train` with no flags (the planner's plan for this machine), checkpoints added
    "default": [],
    # on-demand chunks whose parameters and optimizer live on the host: every fetch, write-back and save path
    "host": ["--on-demand", "--param-home", "host", "--optim-home", "host", "--chunk-mib", "1", "--cache-blocks",
             "3", "--hardware", "CPU"],
    # the same on the tiny model: what the test runs
    "tiny": ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--on-demand", "--param-home", "host",
             "--optim-home", "host", "--chunk-mib", "0.05", "--cache-blocks", "2", "--hardware", "CPU",
             "--eval-batches", "2"],
}
COUNTERS = ("device_bytes", "host_bytes", "grad_buffer_bytes", "host_grad_bytes", "cache_bytes", "disk_bytes")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def _slope_per_1000(xs: list[int], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="default")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--sample-every", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None, help="steps before sampling counts (default: a tenth)")
    p.add_argument("--save-every", type=int, default=None, help="default: a fifth of the steps")
    p.add_argument("--eval-every", type=int, default=None, help="default: a tenth of the steps")
    p.add_argument("--rss-growth-mib", type=float, default=4.0, help="allowed resident growth after warm-up")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import elixir
    from elixir.cli import parse_args
    from elixir.cli.train import build, check_args, loop

    warmup = a.warmup if a.warmup is not None else max(a.sample_every, a.steps // 10)
    out = tempfile.mkdtemp(prefix="elixir-soak-") if os.environ.get("RANK", "0") == "0" else None
    elixir.init_distributed(timeout_s=120)
    import torch.distributed as dist

    if dist.is_initialized():  # every rank writes to rank 0's folder
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    argv = ["train", *JOBS[a.job], "--steps", str(a.steps), "--quiet", "--out", out,
            "--save-every", str(a.save_every or max(1, a.steps // 5)),
            "--eval-every", str(a.eval_every or max(1, a.steps // 10))]
    args = parse_args(argv)
    check_args(args)
    job = build(args)
    samples: list[dict] = []

    def probe(step: int) -> None:
        if step % a.sample_every and step != a.steps:
            return
        gc.collect()  # what is still referenced, not what the collector has not reached yet
        stats = elixir.memory_stats(job.model)
        samples.append({"step": step, "rss": _rss_bytes(), "fds": _fds(), "threads": _threads(),
                        **{k: stats.get(k, 0) for k in COUNTERS}})

    job.on_step = probe
    result = loop(job, args)
    elixir.runtime_of(job.model).close()

    steady = [s for s in samples if s["step"] > warmup]
    summary = {"job": a.job, "steps": a.steps, "warmup": warmup, "rank": job.rank, "world_size": job.world_size,
               "train_loss": result["train_loss"], "samples": len(steady)}
    flat = True
    for key in (*COUNTERS, "fds", "threads"):
        values = [s[key] for s in steady]
        summary[key] = [min(values), max(values)]
        flat &= min(values) == max(values)
    rss = [s["rss"] / 2**20 for s in steady]
    summary["rss_mib"] = [round(min(rss), 1), round(max(rss), 1)]
    summary["rss_first_last_mib"] = [round(rss[0], 1), round(rss[-1], 1)]
    summary["rss_mib_per_1000_steps"] = round(_slope_per_1000([s["step"] for s in steady], rss), 3)
    summary["flat"] = flat and rss[-1] - rss[0] <= a.rss_growth_mib
    every = [summary]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, summary)
    if job.rank == 0:
        for s in every:
            print(json.dumps({k: v for k, v in s.items() if k != "samples"}))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"ranks": every, "samples_rank0": samples}, f, indent=1)
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    ok = all(s["flat"] for s in every)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from elixir.cli import leave

    leave(main())  # without the native teardown that can abort a finished rank (elixir/cli: the Note on leaving)
