"""Mixture-of-Experts vs a dense model of the same total parameter count, same tokens, on several CPU ranks.

Both models are the reference GPT with the same attention, embeddings and depth; only the feed-forward
layer differs:
  moe    E experts (SwiGLU, hidden F each), top-k dropless routing, expert parallel over all ranks
         (`elixir.parallel.expert_parallel(model, world)`: each rank holds E/world experts, tokens travel by
         all-to-all), load-balancing loss on;
  dense  one SwiGLU layer of hidden E*F: the same parameters as the E experts (the MoE router's E*C extra
         weights per layer aside), every token through all of them; data parallel.
So per token the dense layer does E/k times the MoE layer's feed-forward FLOPs. (The dense layer is the
same module with one expert and top-1: its routing runs too, a sort of the tokens and two gathers, all
cheap next to the matmuls.)

Both train in fp32 with AdamW under the plan `elixir.plan` finds for them on this machine
(`Hardware.measure()`, cached), on the same global batch of random byte tokens split by rows over the ranks.
The planner's predicted step time for each (one rank's step; routing assumed balanced, the all-to-alls
charged at the measured collective rate, imbalance not modelled) is printed next to the measurement.

Timing: --warmup untimed steps each, then --reps repetitions; every repetition times --steps steps of each
model in turn (the order alternates), with a barrier before and after and the maximum elapsed time over
the ranks; tokens/s = global tokens / that time. Reported: the median tokens/s of each, and the median over
repetitions of the per-repetition ratio moe/dense (robust to load drifting between repetitions). The load
average before and after is printed: other work on a 2-core machine shifts absolute numbers.

    GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/bench_moe.py --json moe.json
    # one process (no expert parallelism, no communication), the same global batch:
    OMP_NUM_THREADS=1 python bench/bench_moe.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import elixir
from elixir.hardware import Hardware
from elixir.models import GPT, GPTConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=512, help="hidden width F of each expert")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step over all ranks")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per repetition")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    return p.parse_args(argv)


def build(args, moe: bool, world: int) -> GPT:
    torch.manual_seed(0)
    ffn = (
        dict(n_experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden)
        if moe
        else dict(n_experts=1, top_k=1, expert_hidden=args.experts * args.expert_hidden)
    )
    cfg = GPTConfig(
        vocab_size=256,
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        bias=False,
        **ffn,
    )
    model = GPT(cfg).train()
    if moe and world > 1:
        elixir.parallel.expert_parallel(model, world)
    return model


class System:
    def __init__(self, name: str, model: GPT, num_params: int, batch: dict, hardware: Hardware, flops: int):
        self.name, self.num_params, self.batch, self.flops = name, num_params, batch, flops
        self.plan = elixir.plan(model, batch, hardware=hardware)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.model, self.opt = elixir.wrap(model, opt, plan=self.plan)
        self.tokens_per_s: list[float] = []
        self.losses: list[float] = []

    def step(self) -> None:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.losses.append(loss.item())


def timed(system: System, steps: int, global_tokens: int) -> float:
    several = dist.is_initialized()
    if several:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        system.step()
    elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
    if several:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return global_tokens * steps / elapsed.item()


def main(argv=None) -> int:
    args = parse_args(argv)
    elixir.init_distributed()
    torch.set_num_threads(args.threads)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks")
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (args.batch_size, args.seq_len), generator=g).chunk(world)[rank]
    batch = {"input_ids": x, "labels": x}
    hardware = Hardware.measure()
    systems = []
    for name, moe in (("moe", True), ("dense", False)):
        model = build(args, moe, world)
        num_params = build(args, moe, 1).num_params()  # all experts, as one process holds them
        flops = elixir.profile(model, batch).total_flops
        systems.append(System(name, model, num_params, batch, hardware, flops))
    global_tokens = args.batch_size * args.seq_len
    for s in systems:
        for _ in range(args.warmup):
            s.step()
    ratios = []
    for rep in range(args.reps):
        order = systems if rep % 2 == 0 else systems[::-1]
        rate = {s.name: timed(s, args.steps, global_tokens) for s in order}
        for s in systems:
            s.tokens_per_s.append(rate[s.name])
        ratios.append(rate["moe"] / rate["dense"])
    load_after = os.getloadavg()
    if rank == 0:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "world_size": world,
            "args": vars(args),
            "load_before": load_before,
            "load_after": load_after,
            "ratio_moe_over_dense_median": statistics.median(ratios),
            "ratios": ratios,
            "systems": {},
        }
        moe, dense = systems
        predicted_ratio = dense.plan.predicted["step_s"] / moe.plan.predicted["step_s"]
        print(
            f"{world} ranks, {args.batch_size} x {args.seq_len} tokens per step, {args.reps} reps x {args.steps} steps"
        )
        print(
            f"{'model':<6} {'params':>12} {'FLOPs/step/rank':>16} {'tokens/s (median)':>18} "
            f"{'predicted step s':>17} {'predicted tokens/s':>19}  plan"
        )
        for s in systems:
            pred_s = s.plan.predicted["step_s"]
            med = statistics.median(s.tokens_per_s)
            plan_line = s.plan.summary().splitlines()[1].split()
            print(
                f"{s.name:<6} {s.num_params:>12,} {s.flops:>16,} {med:>18,.0f} {pred_s:>17.4f} "
                f"{global_tokens / pred_s:>19,.0f}  {' '.join(plan_line)}"
            )
            result["systems"][s.name] = {
                "num_params": s.num_params,
                "flops_per_step_per_rank": s.flops,
                "tokens_per_s": s.tokens_per_s,
                "tokens_per_s_median": med,
                "predicted": s.plan.predicted,
                "plan": s.plan.summary(),
                "losses_first": s.losses[:3],
            }
        print(
            f"moe / dense throughput: median {statistics.median(ratios):.2f}x "
            f"(per rep: {', '.join(f'{r:.2f}' for r in ratios)}); predicted {predicted_ratio:.2f}x; "
            f"FLOPs ratio dense/moe {dense.flops / moe.flops:.2f}x"
        )
        print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores)")
        result["predicted_ratio"] = predicted_ratio
        result["flops_ratio"] = dense.flops / moe.flops
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
