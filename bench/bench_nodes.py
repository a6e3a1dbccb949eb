"""Chunks sharded over the world against chunks sharded inside nodes: the bytes that cross nodes per step,
counted on this machine, and what the planner predicts for real clusters.

1. Counted (`--nproc 4 --ranks-per-node 2`): that many gloo ranks on this machine play nodes of
   --ranks-per-node ranks, with the environment torchrun gives them (LOCAL_WORLD_SIZE, GROUP_RANK,
   LOCAL_RANK). The same GPT (random weights, fp32, AdamW) is wrapped under a plan of every chunk sharded
   over the world and the same plan sharded inside each node (`shard_over="node"`), for a resident plan
   (ZeRO-2: one all-gather per chunk per step, the write-back) and an on-demand one (ZeRO-3: gathered in
   forward and again in backward). Every chunk collective is counted where the runtime calls it
   (elixir.comm's all_gather, reduce_scatter_mean and all_reduce_sum), by the bytes one rank moves in a
   ring collective over g ranks ((g - 1) / g of the gathered or reduced bytes; 2 (g - 1) / g for an
   all-reduce), split by whether the collective's ranks are on one node or several. The design
   ([Note: hierarchical sharding] in elixir/parallel/nodes.py, `cost.Network`) says a world chunk moves
   (W - 1) / W x numel x (G x itemsize + 4) bytes per rank across nodes per step (G gathers, an fp32
   reduce-scatter), a node chunk 2 (N - 1) / N x numel / L x 4 (the all-reduce of its shard): the script
   prints both and their ratio, the factor by which the bytes across nodes drop, counted and designed.
   It also checks that both layouts end with the same losses (relative 1e-6: fp32 sums in another order).
2. Predicted (`--what-if`): `elixir plan`'s search for OPT-13B and Llama-3-8B on 2 x 8 A100-80GB, over
   one 100 Gb/s Ethernet link per node (ethernet-100g) and over 4 x 200 Gb/s InfiniBand HDR per node
   (4xib-hdr-200g), and OPT-30B on 2 x 8 A100-40GB with 24 or 32 GiB of host memory per GPU: world sharding,
   node sharding and the layout the search picks (per chunk), the global batch --tokens-per-step in
   sequences of --seq-len, predicted TFLOPS per GPU.

    python bench/bench_nodes.py --nproc 4 --ranks-per-node 2 --steps 3
    python bench/bench_nodes.py --what-if --json nodes.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch


def _count(kind: str, group, nbytes: float, counts: dict, ranks_per_node: int) -> None:
    import torch.distributed as dist

    if group.size == 1 or group.replicas is not None:  # a replicated reduction counts its two parts itself
        return
    ranks = dist.get_process_group_ranks(group.process_group)
    where = "across" if len({r // ranks_per_node for r in ranks}) > 1 else "inside"
    key = (kind, where)
    counts[key] = counts.get(key, 0.0) + nbytes


def _instrument(counts: dict, ranks_per_node: int) -> None:
    from elixir import comm

    all_gather, reduce_scatter, all_reduce = comm.all_gather, comm.reduce_scatter_mean, comm.all_reduce_sum

    def counted_all_gather(full, shard, group, **kw):
        g = group.size
        _count("all-gather", group, (g - 1) / g * shard.numel() * g * shard.element_size(), counts, ranks_per_node)
        return all_gather(full, shard, group, **kw)

    def counted_reduce_scatter(shard_out, full, group, **kw):
        g = group.size
        _count("reduce-scatter", group, (g - 1) / g * shard_out.numel() * g * shard_out.element_size(), counts,
               ranks_per_node)
        return reduce_scatter(shard_out, full, group, **kw)

    def counted_all_reduce(t, group, what="all-reduce"):
        g = group.size
        _count("all-reduce", group, 2 * (g - 1) / g * t.numel() * t.element_size(), counts, ranks_per_node)
        return all_reduce(t, group, what)

    comm.all_gather, comm.reduce_scatter_mean, comm.all_reduce_sum = (
        counted_all_gather, counted_reduce_scatter, counted_all_reduce)


def _rank(rank: int, world: int, port: int, args, results) -> None:
    import torch.distributed as dist

    import elixir
    from elixir.models import GPT, GPTConfig

    L = args.ranks_per_node
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank % L), LOCAL_WORLD_SIZE=str(L),
                      GROUP_RANK=str(rank // L))
    torch.set_num_threads(1)
    elixir.init_distributed(timeout_s=120)
    counts: dict = {}
    _instrument(counts, L)
    torch.manual_seed(0)
    base = GPT(GPTConfig.preset(args.model, vocab_size=256, bias=False))
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 256, (args.batch * world, args.seq_len), generator=g) for _ in range(args.steps + 1)]
    out = {}
    for kind in ("resident", "on demand"):
        for over in ("world", "node"):
            model = copy.deepcopy(base)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, fused=True)
            numels = sorted(p.numel() for p in model.parameters())
            plan = elixir.Plan.uniform(model, chunk_mib=max(numels[-1] * 4 / 2**20, 0.5), cache_blocks=2,
                                       resident=kind == "resident", optimizer=opt, shard_over=over, nodes=world // L)
            model, opt = elixir.wrap(model, opt, plan=plan)
            losses = []
            for i, x in enumerate(data):
                if i == 1:  # after a warm-up step: steady state
                    counts.clear()
                    gathers0 = elixir.memory_stats(model)["gathers"]
                loss = model(input_ids=x.chunk(world)[rank], labels=x.chunk(world)[rank]).loss
                opt.backward(loss)
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            rt = elixir.runtime_of(model)
            steps = args.steps
            numel = sum(c.numel for c in rt.chunks)
            fetches = (elixir.memory_stats(model)["gathers"] - gathers0) / steps
            # gathers per chunk per step: the fetches, and for resident chunks the write-back
            gathers = (fetches + (len(rt.chunks) if kind == "resident" else 0)) / len(rt.chunks)
            out[(kind, over)] = {
                "losses": losses, "chunks": len(rt.chunks), "numel_padded": numel, "gathers_per_chunk": gathers,
                "group": rt.chunks[0].group.size,
                "bytes": {f"{k} {w}": v / steps for (k, w), v in counts.items()},
            }
            counts.clear()
    dist.barrier()
    if rank == 0:
        results.put(out)
    dist.destroy_process_group()


def _total(run: dict, where: str) -> float:
    return sum(v for k, v in run["bytes"].items() if k.endswith(where))


def counted(args) -> dict:
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from dist import free_port

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    world = args.nproc
    started = time.time()
    mp.start_processes(_rank, args=(world, free_port(), args, results), nprocs=world, start_method="spawn")
    got = results.get()
    W, L = world, args.ranks_per_node
    N = W // L
    rows = []
    for kind in ("resident", "on demand"):
        w, n = got[(kind, "world")], got[(kind, "node")]
        across = {o: _total(got[(kind, o)], "across") for o in ("world", "node")}
        inside = {o: _total(got[(kind, o)], "inside") for o in ("world", "node")}
        G = w["gathers_per_chunk"]
        design_world = (W - 1) / W * w["numel_padded"] * (G * 4 + 4)
        design_node = 2 * (N - 1) / N * n["numel_padded"] / L * 4
        rel = max(abs(a - b) / abs(b) for a, b in zip(n["losses"], w["losses"]))
        rows.append({
            "plan": kind, "gathers_per_chunk_per_step": G,
            "across_world_bytes": across["world"], "across_node_bytes": across["node"],
            "inside_world_bytes": inside["world"], "inside_node_bytes": inside["node"],
            "counted_factor": across["world"] / across["node"],
            "design_world_bytes": design_world, "design_node_bytes": design_node,
            "design_factor": design_world / design_node, "loss_rel_diff": rel,
            "detail": {"world": w["bytes"], "node": n["bytes"]},
        })
    print(f"{W} gloo ranks as {N} nodes x {L}; GPT preset {args.model!r}, batch {args.batch} x {args.seq_len} per "
          f"rank, fp32, {args.steps} steps after one warm-up ({time.time() - started:.0f} s)")
    print(f"{'plan':<10} {'gathers':>7} | {'across nodes per rank and step (KiB)':^44} | {'factor':^15} | inside (KiB)")
    print(f"{'':<10} {'/chunk':>7} | {'world':>10} {'node':>10} {'design w':>10} {'design n':>10} | {'counted':>7} "
          f"{'design':>7} | {'world':>7} {'node':>7}")
    for r in rows:
        print(f"{r['plan']:<10} {r['gathers_per_chunk_per_step']:>7.2f} | {r['across_world_bytes'] / 1024:>10.1f} "
              f"{r['across_node_bytes'] / 1024:>10.1f} {r['design_world_bytes'] / 1024:>10.1f} "
              f"{r['design_node_bytes'] / 1024:>10.1f} | {r['counted_factor']:>7.2f} {r['design_factor']:>7.2f} | "
              f"{r['inside_world_bytes'] / 1024:>7.1f} {r['inside_node_bytes'] / 1024:>7.1f}")
    bad = [r for r in rows if r["loss_rel_diff"] > 1e-6]
    if bad:
        print(f"losses differ between the layouts: {[(r['plan'], r['loss_rel_diff']) for r in bad]}")
    return {"rows": rows, "ok": not bad}


WHAT_IF = [("opt-13b", "ethernet-100g", "A100-80GB", None), ("opt-13b", "4xib-hdr-200g", "A100-80GB", None),
           ("llama-3-8b", "ethernet-100g", "A100-80GB", None), ("llama-3-8b", "4xib-hdr-200g", "A100-80GB", None),
           # short of host memory: 24 GiB per GPU holds OPT-30B's host-side states sharded over the world, not
           # sharded inside a node (twice as much per rank); see [Note: the layout per chunk]
           ("opt-30b", "ethernet-100g", "A100-40GB", "24GiB"), ("opt-30b", "4xib-hdr-200g", "A100-40GB", "24GiB"),
           ("opt-30b", "4xib-hdr-200g", "A100-40GB", "32GiB")]


def what_if(args) -> list[dict]:
    from elixir.hardware import Hardware, parse_link
    from elixir.models.families import build_family
    from elixir.search import PlanDoesNotFitError
    from elixir.search.api import plan_batch

    rows = []
    models = {}
    for model_name, link, gpu, host in WHAT_IF:
        rate, latency = parse_link(link)
        hw = Hardware.preset(gpu).with_network(inter_node_bytes_per_s=rate, inter_node_latency_s=latency)
        if host:
            hw = hw.with_memory(host_bytes=host)
        if model_name not in models:
            models = {model_name: build_family(model_name).train()}  # one model alive at a time
        model = models[model_name]
        ids = torch.zeros((1, args.seq_len), dtype=torch.long)
        row = {"model": model_name, "link": link, "inter_node_GBps": rate / 1e9, "gpu": gpu,
               "host_per_gpu": host or f"{hw.host_bytes / 2**30:.0f}GiB"}
        for over in ("world", "node", None):
            key = over or "searched"
            try:
                found = plan_batch(model, {"input_ids": ids, "labels": ids}, hardware=hw, world_size=16,
                                   compute_dtype=torch.bfloat16, tokens_per_step=args.tokens_per_step, nodes=2,
                                   shard_over=over)
            except PlanDoesNotFitError as e:
                row[key] = {"fits": False, "error": str(e).splitlines()[0]}
                continue
            plan, pred = found.plan, found.prediction
            row[key] = {"fits": True, "tflops_per_gpu": pred.flops / pred.step_s / 1e12, "step_s": pred.step_s,
                        "stall_s": pred.stall_s, "shard_over": sorted({c.shard_over for c in plan.chunks}),
                        "node_chunks": sum(c.shard_over == "node" for c in plan.chunks),
                        "micro_batch": plan.micro_batch_size, "grad_accum": plan.grad_accum,
                        "checkpoint_every": plan.checkpoint_every,
                        "resident": sum(c.resident for c in plan.chunks), "chunks": len(plan.chunks),
                        "optim_host": sum(c.optim_home == "host" for c in plan.chunks)}
        rows.append(row)

        def cell(r):
            if not r["fits"]:
                return "does not fit"
            layout = "/".join(r["shard_over"]) if len(r["shard_over"]) == 1 else \
                f"{r['node_chunks']} of {r['chunks']} chunks node"
            return f"{r['tflops_per_gpu']:.1f} ({r['step_s']:.1f} s, {layout})"
        print(f"{model_name:<11} {link:<14} {gpu} host {row['host_per_gpu']}: world {cell(row['world'])}  node "
              f"{cell(row['node'])}  searched {cell(row['searched'])} TFLOPS per GPU", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--model", default="tiny", help="GPT preset of the counted run")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=64, help="counted run; --what-if uses 2048 unless given")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--what-if", action="store_true", help="the planner's tables instead of the counted run")
    p.add_argument("--tokens-per-step", type=int, default=2**20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    if args.what_if:
        if "--seq-len" not in sys.argv:
            args.seq_len = 2048
        result = {"what_if": what_if(args)}
        ok = True
    else:
        result = counted(args)
        ok = result["ok"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **result}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
