"""Stage 0b of the GPU benchmark: a checkpoint resumes bit for bit on the GPU, with shards on the host.

The GPT "small" preset (tiny with --dry-run) under a plan whose chunks are all gathered on demand from
pinned host shards, optimizer on the host (the copy-stream path of elixir/accel.py), fp32 and bf16:
6 uninterrupted steps against 3 steps, elixir.save, a fresh model and optimizer, elixir.load, 3 steps.
Checked: the losses are identical, and save and load times are reported.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import time

import gpubench as G
import torch

import elixir
from elixir import bench as B

STEPS = 6


def build(base, device, dtype):
    m = copy.deepcopy(base).train()
    opt = B.adamw(m.parameters())
    biggest = max(p.numel() for p in m.parameters()) * dtype.itemsize / 2**20
    plan = elixir.Plan.uniform(m, chunk_mib=math.ceil(biggest * 1024) / 1024, cache_blocks=4, resident=False,
                               param_home="host", optim_home="host", compute_dtype=dtype, optimizer=opt)
    return elixir.wrap(m, opt, plan=plan, device=device)


def run(model, opt, x, steps):
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> int:
    args = G.parser(__doc__.splitlines()[0], budget_s=40).parse_args()
    device = G.device_for(args)
    results: dict = {"machine": G.machine(device), "checks": []}
    ok = True
    path = os.path.join(args.out, "checkpoint-stage")
    base = B.build_model("tiny" if args.dry_run else "small", device="cpu")
    rows, seq = (4, 64) if args.dry_run else (8, 256)
    x = B.make_batch(rows, seq, base.config.vocab_size).to(device)
    for dtype_name in ("fp32", "bf16"):
        dtype = B.DTYPES[dtype_name]
        whole = run(*build(base, device, dtype), x, STEPS)
        m, opt = build(base, device, dtype)
        first = run(m, opt, x, STEPS // 2)
        t = time.perf_counter()
        elixir.save(m, opt, path)
        save_s = time.perf_counter() - t
        m, opt = build(base, device, dtype)
        t = time.perf_counter()
        elixir.load(m, opt, path)
        load_s = time.perf_counter() - t
        second = run(m, opt, x, STEPS - STEPS // 2)
        same = first + second == whole
        ok &= same
        results["checks"].append({"dtype": dtype_name, "uninterrupted": whole, "resumed": first + second,
                                  "identical": same, "save_s": save_s, "load_s": load_s})
        G.log(f"{dtype_name}: resumed losses {'identical' if same else 'DIFFER'}; save {save_s:.2f} s, "
              f"load {load_s:.2f} s")
        G.write_json(args, "checkpoint", results | {"ok": ok})
    shutil.rmtree(path, ignore_errors=True)
    G.log(f"checkpoint {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
