"""The disk tier against host homes on this machine: the same GPT, the same chunks, the optimizer of most
chunks moved to a scratch file so that host model data falls to a quarter, side by side.

Systems, each wrapped once from deep copies of one model (identical weights), trained on the same batch of
random byte tokens with `torch.optim.AdamW(lr=1e-4, fused=True)` in fp32, gradients clipped at 1.0:
  host      every chunk on demand, its shard on the device, fp32 master and AdamW states on the host;
  disk      the same plan with the optimizer of the first k chunks on disk (optim_home="disk"), k the
            fewest that bring the planner's host model data to a quarter of the host plan's;
  compute   the host plan doing forward, backward and zero_grad without any optimizer step: the compute
            step, gradients reduced and copied to the host included, the floor of both;
  deepspeed ZeRO-3 with `offload_optimizer: nvme` (ZeRO-Infinity) on DS_ACCELERATOR=cpu, its own AdamW
            (DeepSpeedCPUAdam) and async I/O, the same model, batch and scratch folder (--deepspeed).
After --warmup steps each, the systems alternate: every repetition runs --steps timed steps of each in
turn (rotating the order). Reported: the median ms/step (min-max), the disk traffic per step (the disk
tier's byte counters), the scratch folder's sequential bandwidth (`elixir.hardware.measure_disk`, O_DIRECT),
the limit max(compute step, disk reads / read bandwidth + disk writes / write bandwidth), and the ratios
disk/limit (target: at most 1.2) and disk/host. The host and disk systems must end with bit-identical
parameters (checked; exit status 1 otherwise).

    python bench/bench_disk.py --disk /path/on/nvme            # 50m preset, batch 4 x 256, 5 reps x 2 steps
    python bench/bench_disk.py --disk /tmp/scratch --deepspeed --json disk.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

import elixir
from elixir.hardware import Hardware, measure_disk
from elixir.models import GPT, GPTConfig
from elixir.search.cost import simulate

LR = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="50m", help=f"GPT preset ({', '.join(GPTConfig.preset_names())})")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--chunk-mib", type=float, default=8.0, help="chunk size (holds the largest parameter)")
    p.add_argument("--cache-blocks", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--disk", default=None, help="scratch folder (default: a temporary one in the current folder)")
    p.add_argument("--host-share", type=float, default=0.25, help="host model data of the disk plan over the "
                   "host plan's")
    p.add_argument("--deepspeed", action="store_true", help="also ZeRO-Infinity (DeepSpeed, nvme offload)")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def host_plan(model, opt, args) -> elixir.Plan:
    return elixir.Plan.uniform(model, chunk_mib=args.chunk_mib, cache_blocks=args.cache_blocks, resident=False,
                               param_home="device", optim_home="host", optimizer=opt)


def disk_plan(plan: elixir.Plan, prof, hw: Hardware, share: float) -> tuple[elixir.Plan, int]:
    """The plan with the optimizer of the fewest leading chunks on disk that brings host model data to
    `share` of the host plan's (the planner's memory model, which equals the runtime's counters)."""
    target = simulate(prof, plan, hw).model_host_bytes * share
    for k in range(1, len(plan.chunks) + 1):
        chunks = tuple(dataclasses.replace(c, optim_home="disk") if i < k else c for i, c in enumerate(plan.chunks))
        moved = dataclasses.replace(plan, chunks=chunks)
        if simulate(prof, moved, hw).model_host_bytes <= target:
            return moved, k
    raise SystemExit(f"even every optimizer on disk does not bring the host to {share:.0%}; raise --host-share")


class System:
    def __init__(self, name, step, model=None, opt=None, note=""):
        self.name, self.step, self.model, self.opt, self.note = name, step, model, opt, note
        self.ms: list[float] = []


def elixir_system(name, base, plan, args, disk=None, optimizer_step=True) -> System:
    m = copy.deepcopy(base)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, fused=True)
    if not optimizer_step:
        plan = dataclasses.replace(plan, overlap=False)
    m, opt = elixir.wrap(m, opt, plan=plan, disk=disk)

    def step(x):
        loss = m(input_ids=x, labels=x).loss
        opt.backward(loss)
        if optimizer_step:
            opt.clip_grad_norm_(1.0)
            opt.step()
        opt.zero_grad()
        return loss

    return System(name, step, m, opt)


def deepspeed_system(base, args, folder) -> System:
    """ZeRO-Infinity: ZeRO-3 with the optimizer states on NVMe through DeepSpeed's async I/O."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from elixir import bench as B

    B.single_process_group(torch.device("cpu"))
    import deepspeed

    m = copy.deepcopy(base).train()
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "steps_per_print": 10**9, "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": folder,
                                                                "pin_memory": False, "buffer_count": 4}},
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True,
                "thread_count": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.01}},
    }
    engine, opt, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=config)

    def step(x):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        return loss

    return System("deepspeed-infinity", step, note=type(getattr(opt, "optimizer", opt)).__name__)


def load_average() -> float:
    return os.getloadavg()[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = args.disk or tempfile.mkdtemp(prefix="elixir-bench-disk-", dir=os.getcwd())
    os.makedirs(folder, exist_ok=True)
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = load_average()
    read_bw, write_bw = measure_disk(folder, cache=False)
    print(f"scratch folder {folder}: {read_bw / 1e9:.2f} GB/s read, {write_bw / 1e9:.2f} GB/s write "
          "(sequential O_DIRECT, measured now)", flush=True)

    base = GPT(GPTConfig.preset(args.model)).train()
    x = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len),
                      generator=torch.Generator().manual_seed(1))
    params = base.num_params()
    plan = host_plan(base, torch.optim.AdamW(base.parameters()), args)
    prof = elixir.profile(copy.deepcopy(base), {"input_ids": x, "labels": x})
    hw = Hardware.measure().with_disk(disk_bytes=10**12, read_bytes_per_s=read_bw, write_bytes_per_s=write_bw)
    on_disk, k = disk_plan(plan, prof, hw, args.host_share)
    pred = {"host": simulate(prof, plan, hw), "disk": simulate(prof, on_disk, hw)}
    print(f"{args.model}: {params / 1e6:.1f}M parameters, batch {args.batch_size} x {args.seq_len}, fp32; "
          f"{len(plan.chunks)} chunks, the optimizer of {k} of them on disk", flush=True)

    systems = [elixir_system("host", base, plan, args), elixir_system("disk", base, on_disk, args, disk=folder),
               elixir_system("compute", base, plan, args, optimizer_step=False)]
    skipped = {}
    if args.deepspeed:
        ds_folder = os.path.join(folder, "deepspeed")
        os.makedirs(ds_folder, exist_ok=True)
        try:
            systems.append(deepspeed_system(base, args, ds_folder))
        except Exception as e:  # noqa: BLE001 - report why it could not run
            skipped["deepspeed-infinity"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"deepspeed-infinity not run: {skipped['deepspeed-infinity']}", flush=True)

    for s in systems:
        for _ in range(args.warmup):
            s.step(x)
    disk_stats = elixir.memory_stats(systems[1].model)
    read0, written0 = disk_stats["disk_bytes_read"], disk_stats["disk_bytes_written"]
    for rep in range(args.reps):
        order = systems[rep % len(systems):] + systems[: rep % len(systems)]
        for s in order:
            gc.collect()
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = s.step(x)
            loss.item()
            s.ms.append((time.perf_counter() - t) / args.steps * 1e3)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{s.name} {s.ms[-1]:.0f} ms" for s in systems), flush=True)
    disk_stats = elixir.memory_stats(systems[1].model)
    timed = args.reps * args.steps
    reads = (disk_stats["disk_bytes_read"] - read0) / timed
    writes = (disk_stats["disk_bytes_written"] - written0) / timed
    traffic_s = reads / read_bw + writes / write_bw

    # the promise: host and disk homes train bit for bit alike (both took the same steps)
    a, b = elixir.full_state_dict(systems[0].model), elixir.full_state_dict(systems[1].model)
    identical = all(torch.equal(a[n], b[n]) for n in a)

    med = {s.name: statistics.median(s.ms) for s in systems}
    limit = max(med["compute"], traffic_s * 1e3)
    rows = []
    print()
    print("| system | ms/step median (min-max) | planner's ms/step | host model data MiB | disk MiB |")
    print("|---|---:|---:|---:|---:|")
    for s in systems:
        st = elixir.memory_stats(s.model) if s.model is not None else {}
        p = pred.get(s.name)
        rows.append({"system": s.name, "ms_median": med[s.name], "ms_min": min(s.ms), "ms_max": max(s.ms),
                     "predicted_ms": p.step_s * 1e3 if p else None, "host_bytes_peak": st.get("host_bytes_peak"),
                     "disk_bytes": st.get("disk_bytes"), "note": s.note})
        predicted = f"{p.step_s * 1e3:,.0f}" if p else "-"
        host = f"{st['host_bytes_peak'] / 2**20:,.1f}" if st else "-"
        disk = f"{st['disk_bytes'] / 2**20:,.1f}" if st else "-"
        print(f"| {s.name} | {med[s.name]:,.0f} ({min(s.ms):,.0f}-{max(s.ms):,.0f}) | {predicted} | {host} | {disk} |")
    print()
    print(f"disk traffic per step: {reads / 2**20:,.1f} MiB read, {writes / 2**20:,.1f} MiB written = "
          f"{traffic_s * 1e3:,.0f} ms at the measured bandwidth; compute step {med['compute']:,.0f} ms; "
          f"limit {limit:,.0f} ms")
    print(f"disk / limit = {med['disk'] / limit:.2f} (target <= 1.2); disk / host = {med['disk'] / med['host']:.2f}"
          + (f"; deepspeed-infinity / disk = {med['deepspeed-infinity'] / med['disk']:.2f}"
             if "deepspeed-infinity" in med else ""))
    print(f"host and disk parameters bit-identical: {identical}; load average {load_before:.2f} -> "
          f"{load_average():.2f}")
    result = {
        "date_utc": started_utc, "commit": _commit(), "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "args": vars(args), "params": params, "chunks_on_disk": k,
        "chunks": len(plan.chunks), "disk_read_bytes_per_s": read_bw, "disk_write_bytes_per_s": write_bw,
        "disk_read_bytes_per_step": reads, "disk_written_bytes_per_step": writes, "traffic_ms": traffic_s * 1e3,
        "limit_ms": limit, "rows": rows, "skipped": skipped, "identical": identical,
        "load_average": [load_before, load_average()],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    for s in systems:
        if s.model is not None:
            elixir.runtime_of(s.model).close()
    return 0 if identical else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
