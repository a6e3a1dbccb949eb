"""Chunks sharded inside nodes (shard_over="node") train like chunks sharded over the world.

Four gloo ranks spawned here play two "nodes" of two ranks, with the environment torchrun would give them
(LOCAL_WORLD_SIZE=2, GROUP_RANK, LOCAL_RANK). Every model is trained twice in the same processes, once
sharded over the world and once inside each node, from the same weights and batches:
- each rank on the same batch: every gradient sum is then exact in any order, so the two layouts must
  give the same bits (losses and parameters);
- each rank on its own rows of the global batch: world sharding sums four gradients as ((a+b)+c)+d, node
  sharding as (a+b)+(c+d), so they agree to the rounding of fp32 sums only: relative 1e-6 after 5 AdamW
  steps, with lr=1e-3 and eps=1e-6 as tests/test_distributed.py (its docstring says why), the tolerance of
  its comparison of shared memory with sockets, the same two orders of one sum.
Also: model data per rank as the plan says, checkpoints saved in one layout resumed in the other (one
replica writes each shard), and both ranks of a node dying give the other node a CollectiveError.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from dist import free_port, run_ranks

import elixir
from elixir.models import GPT, GPTConfig
from elixir.parallel.nodes import node_layout_from_env
from helpers import VOCAB, assert_close_rel, assert_params_close, batches, loss_of, make_plan

STEPS = 5
EPS = 1e-6
LR = 1e-3
RANKS_PER_NODE = 2
TIMEOUT_S = 5.0


def _as_torchrun(rank: int, world: int) -> None:
    """The environment torchrun gives rank `rank` of `world` ranks on nodes of RANKS_PER_NODE."""
    os.environ.update(LOCAL_WORLD_SIZE=str(RANKS_PER_NODE), GROUP_RANK=str(rank // RANKS_PER_NODE),
                      LOCAL_RANK=str(rank % RANKS_PER_NODE), RANK=str(rank), WORLD_SIZE=str(world))


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False))


def _plan(model, kind: str, opt, shard_over: str) -> elixir.Plan:
    """`make_plan`'s plan on 2 nodes, every chunk sharded over `shard_over`; "alternate": every other chunk
    inside the nodes, the rest over the world."""
    plan = make_plan(model, kind, opt)
    chunks = tuple(dataclasses.replace(c, shard_over=("node" if i % 2 else "world") if shard_over == "alternate"
                                       else shard_over) for i, c in enumerate(plan.chunks))
    return dataclasses.replace(plan, chunks=chunks, nodes=2)


def _train(model, kind, shard_over, data, rank, world, *, same_batch, clip=False):
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
    m, opt = elixir.wrap(m, opt, plan=_plan(m, kind, opt, shard_over))
    losses, norms = [], []
    for x in data:
        loss = loss_of(m, x if same_batch else x.chunk(world)[rank])
        loss.backward()
        if clip:
            norms.append(opt.clip_grad_norm_(0.05).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    states = {c.index: {k: v.clone() for k, v in opt.state[c.master].items()} for c in opt.chunks}
    return losses, norms, elixir.full_state_dict(m), states, m, opt


def _parity(rank, world):
    _as_torchrun(rank, world)
    model = _model()
    data = batches(STEPS, batch=8)
    for kind, over in [(k, "node") for k in ("resident", "on_demand", "host", "mixed")] + [("mixed", "alternate")]:
        w = _train(model, kind, "world", data, rank, world, same_batch=True)
        n = _train(model, kind, over, data, rank, world, same_batch=True)
        assert w[0] == n[0], (kind, over, w[0], n[0])
        assert all(torch.equal(w[2][k], n[2][k]) for k in w[2]), (kind, over)
    for kind, over in (("on_demand", "node"), ("host", "node"), ("host", "alternate")):
        w = _train(model, kind, "world", data, rank, world, same_batch=False, clip=True)
        n = _train(model, kind, over, data, rank, world, same_batch=False, clip=True)
        assert_close_rel(n[0], w[0], 1e-6)
        assert_close_rel(n[1], w[1], 1e-6)  # the norm counts each replicated shard once
        assert_params_close(n[2], w[2], 1e-6)
        assert n[1][0] > 0.05  # the clip acted


@pytest.mark.dist
def test_node_sharding_matches_world_sharding_and_holds_a_node_shard_per_rank():
    q = mp.get_context("spawn").SimpleQueue()
    run_ranks(_parity_and_memory, 4, q)
    rows = [q.get()[1] for _ in range(4)]
    assert all(r == rows[0] for r in rows)
    padding = 3 * 4 * 4 * len(_model().state_dict())  # at most 3 padding elements per chunk
    # twice the world shard: a node's two ranks hold what the world's four do
    assert abs(rows[0]["node"] - 2 * rows[0]["world"]) <= padding


def _parity_and_memory(rank, world, results):
    _parity(rank, world)
    _memory(rank, world, results)
    _experts(rank, world)


def _experts(rank, world):
    """Expert parallelism inside each node (ep_size 2): the experts' chunks are sharded over the ranks of
    their expert-data-parallel group on the node (one here) and all-reduced across nodes."""
    from elixir.parallel import expert_parallel

    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False, n_experts=4, top_k=2, expert_hidden=32)
    data = batches(3, batch=8)
    runs = {}
    for over in ("world", "node"):
        torch.manual_seed(0)
        m = expert_parallel(GPT(cfg).train(), 2)
        opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
        plan = _plan(m, "on_demand", opt, over)
        m, opt = elixir.wrap(m, opt, plan=plan)
        groups = {c.group.size for c in elixir.runtime_of(m).chunks}
        assert groups == ({4, 2} if over == "world" else {2, 1}), (over, groups)
        losses = []
        for x in data:  # every rank on the same batch: exact sums, the same bits
            loss = loss_of(m, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[over] = losses, elixir.full_state_dict(m)
    assert runs["world"][0] == runs["node"][0]
    assert all(torch.equal(runs["world"][1][k], runs["node"][1][k]) for k in runs["world"][1])


def _memory(rank, world, results):
    _as_torchrun(rank, world)
    model = _model()
    out = {}
    for over in ("world", "node"):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
        m, opt = elixir.wrap(m, opt, plan=_plan(m, "host", opt, over))
        loss_of(m, batches(1, batch=8)[0].chunk(world)[rank]).backward()
        opt.step()
        opt.zero_grad()
        rt = elixir.runtime_of(m)
        stats = elixir.memory_stats(m)
        ranks = RANKS_PER_NODE if over == "node" else world
        assert all(c.group.size == ranks for c in rt.chunks)
        assert (rt.tracker.shared is not None) == (over == "node")  # shared memory inside a node, never across
        padded = sum(-(-c.numel // ranks) * ranks for c in rt.chunks)
        # host: the fp32 shard (its own master) and AdamW's two states, each 1/ranks of every chunk
        assert stats["host_bytes"] - stats["host_grad_bytes"] == 3 * 4 * padded // ranks, over
        out[over] = stats["host_bytes"] - stats["host_grad_bytes"]
    results.put((rank, out))


def _wrapped(model, over):
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
    return elixir.wrap(m, opt, plan=_plan(m, "on_demand", opt, over))


def _steps(m, opt, data):
    for x in data:
        loss_of(m, x).backward()
        opt.step()
        opt.zero_grad()


def _resume_across(rank, world, folder):
    _as_torchrun(rank, world)
    model = _model()
    data = batches(4, batch=8)
    for saved, resumed in (("world", "node"), ("node", "world")):
        path = os.path.join(folder, f"{saved}-to-{resumed}")
        m, opt = _wrapped(model, saved)
        _steps(m, opt, data[:2])
        elixir.save(m, opt, path)
        _steps(m, opt, data[2:])
        want = elixir.full_state_dict(m)
        m2, opt2 = _wrapped(model, resumed)
        elixir.load(m2, opt2, path)
        _steps(m2, opt2, data[2:])
        got = elixir.full_state_dict(m2)
        # every rank on the same batch: the sums are exact, so the other layout resumes to the same bits
        assert all(torch.equal(got[k], want[k]) for k in want), (saved, resumed)
        if rank == 0:
            with open(os.path.join(path, "manifest.json")) as f:
                written = [len(docs) for docs in json.load(f)["ranks"]]
            if saved == "node":  # one replica writes each shard: the first node's ranks
                assert written[2:] == [0, 0] and written[0] == written[1] > 0, written
            else:
                assert all(n == written[0] > 0 for n in written), written


@pytest.mark.dist
def test_a_checkpoint_resumes_in_the_other_layout(tmp_path):
    run_ranks(_resume_across, 4, str(tmp_path))


def _dead_node(rank, world, port, results, survivors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    _as_torchrun(rank, world)
    torch.set_num_threads(1)
    elixir.init_distributed(timeout_s=TIMEOUT_S)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model, opt = elixir.wrap(model, opt, plan=_plan(model, "on_demand", opt, "node"))
    if rank >= RANKS_PER_NODE:  # the second node dies mid-forward of the first step
        model.h[1].register_forward_pre_hook(lambda module, args: os._exit(3))
    x = batches(1, batch=8)[0].chunk(world)[rank]
    started = time.monotonic()
    try:
        for _ in range(3):
            loss_of(model, x).backward()
            opt.step()
            opt.zero_grad()
    except elixir.CollectiveError as e:
        results.put((rank, "CollectiveError", str(e), time.monotonic() - started))
        # stay until the other survivor has met its own error too: a rank that left first would take its shared
        # memory with it, and its node peer would then fail on that instead of on the dead node
        survivors.wait(timeout=TIMEOUT_S * 6)
        os._exit(0)  # leave without tearing the broken group down
    results.put((rank, "finished", "", time.monotonic() - started))


@pytest.mark.dist
def test_a_dead_node_is_a_named_error_on_the_other():
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    survivors = ctx.Barrier(RANKS_PER_NODE)
    procs = [ctx.Process(target=_dead_node, args=(r, 4, port, results, survivors)) for r in range(4)]
    for p in procs:
        p.start()
    for p in procs[:RANKS_PER_NODE]:
        p.join(timeout=TIMEOUT_S * 6 + 60)
    hung = [p.is_alive() for p in procs[:RANKS_PER_NODE]]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not any(hung), "a rank of the surviving node hung instead of failing"
    got = sorted(results.get() for _ in range(RANKS_PER_NODE))
    assert [(r, kind) for r, kind, *_ in got] == [(0, "CollectiveError"), (1, "CollectiveError")], got
    for _, _, message, waited in got:
        assert "across nodes" in message and "within the timeout (5 s" in message, message
        assert waited < TIMEOUT_S * 3 + 10


# --- one process: the plan and the environment ------------------------------------------------------


def test_plan_json_leaves_world_out_and_reads_node_back():
    model = _model()
    world = elixir.Plan.uniform(model, chunk_mib=0.05, world_size=4)
    text = world.to_json()
    assert "shard_over" not in text and '"nodes"' not in text  # plans without nodes read as before
    assert elixir.Plan.from_json(text) == world
    node = elixir.Plan.uniform(model, chunk_mib=0.05, world_size=4, nodes=2, shard_over="node")
    back = elixir.Plan.from_json(node.to_json())
    assert back == node and all(c.shard_over == "node" for c in back.chunks) and back.nodes == 2
    assert all(back.chunk_ranks(c) == 2 for c in back.chunks)
    assert "sharded over" in node.summary() and "on 2 nodes" in node.summary()


def test_bad_shard_over_and_nodes_are_named():
    model = _model()
    with pytest.raises(ValueError, match="shard_over='rack'.*'world'.*'node'"):
        elixir.Plan.uniform(model, chunk_mib=0.05, world_size=4, shard_over="rack")
    with pytest.raises(ValueError, match="nodes=3 must be a positive int that divides world_size=4"):
        elixir.Plan.uniform(model, chunk_mib=0.05, world_size=4, nodes=3)
    plan = elixir.Plan.uniform(model, chunk_mib=0.05, world_size=4, nodes=2)
    doc = json.loads(plan.to_json())
    doc["chunks"][0]["shard_over"] = "rack"
    with pytest.raises(ValueError, match="shard_over"):
        elixir.Plan.from_json(json.dumps(doc))


def test_nodes_from_torchrun_environment():
    env = dict(LOCAL_WORLD_SIZE="2", GROUP_RANK="1", LOCAL_RANK="1")
    layout = node_layout_from_env(4, 3, env)
    assert (layout.nodes, layout.ranks_per_node, layout.node_rank, layout.local_rank) == (2, 2, 1, 1)
    assert node_layout_from_env(4, 3, dict(LOCAL_WORLD_SIZE="2", NODE_RANK="1", LOCAL_RANK="1")) == layout
    assert node_layout_from_env(4, 3, {}) is None
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=3 does not divide the world size 4"):
        node_layout_from_env(4, 3, dict(env, LOCAL_WORLD_SIZE="3"))
    with pytest.raises(ValueError, match="rank = GROUP_RANK \\* LOCAL_WORLD_SIZE \\+ LOCAL_RANK = 1"):
        node_layout_from_env(4, 3, dict(env, GROUP_RANK="0"))
    with pytest.raises(ValueError, match="GROUP_RANK \\(or NODE_RANK\\)=None"):
        node_layout_from_env(4, 3, dict(LOCAL_WORLD_SIZE="2", LOCAL_RANK="1"))


def test_one_process_runs_a_node_plan_as_one_node():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    plan = elixir.Plan.uniform(model, chunk_mib=0.05, world_size=1, shard_over="node", optimizer=opt)
    m, opt = elixir.wrap(model, opt, plan=plan)
    loss_of(m, batches(1)[0]).backward()
    opt.step()
    assert all(c.group.size == 1 for c in elixir.runtime_of(m).chunks)


# --- the calibration: both levels measured on several nodes ------------------------------------------


def _measured(rank, world, folder, results):
    from elixir.hardware import Hardware, measure

    cpu, sync = torch.device("cpu"), (lambda: None)
    os.environ["ELIXIR_CACHE_DIR"] = str(folder)
    measure._machine_busy = lambda: ""  # the suite's own load must not decide whether the figures are cached
    _as_torchrun(rank, world)
    two = measure._collective_figures(cpu, 2**16, sync, 0.02)
    hw = Hardware.measure(quick=True)
    again = Hardware.measure(quick=True)  # read back from the cache of a two-node calibration
    # the same processes launched as one node of four: one level, as before
    os.environ.update(LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", LOCAL_RANK=str(rank))
    one = measure._collective_figures(cpu, 2**16, sync, 0.02)
    results.put((rank, two, one, hw.to_json(), again.to_json()))


@pytest.mark.dist
def test_measure_on_two_nodes_times_the_links_inside_and_between_nodes(tmp_path):
    """Four ranks as two nodes of two: the collectives inside a node (their own rate and latency) and across
    nodes (the node's links and their latency) are measured, the same figures on every rank, and cached
    apart from a one-node calibration. On localhost both levels are the same loopback, so neither is
    asserted to be slower."""
    from elixir.hardware import Hardware

    q = mp.get_context("spawn").SimpleQueue()
    run_ranks(_measured, 4, tmp_path, q)
    rows = sorted((q.get() for _ in range(4)), key=lambda r: r[0])
    _, two, one, measured, again = rows[0]
    assert all(r[1] == two and r[2] == one for r in rows)  # the slowest rank's times: every rank alike
    network = ("intra_node_latency_s", "inter_node_bytes_per_s", "inter_node_latency_s")
    for name in network:
        assert 0 < two[name] < math.inf, name
    assert sorted(two["collective_bytes_per_s"]) == [2, 4]  # inside a node, and over the world
    assert all(0 < r < math.inf for r in two["collective_bytes_per_s"].values())
    # one node: the world's rate alone, the network left to the one-level defaults
    assert list(one) == ["collective_bytes_per_s"] and list(one["collective_bytes_per_s"]) == [4]
    one_level = Hardware.preset("CPU")
    hw = Hardware.from_json(measured)
    for name in network:
        assert getattr(hw, name) > 0 and getattr(one_level, name) == 0, name
    assert sorted(hw.collective_bytes_per_s) == [2, 4]
    across = hw.bus_rate(4, across_nodes=True, ranks_per_node=2, world_size=4)
    assert across == min(hw.collective_rate(2), hw.inter_node_bytes_per_s / 2)
    assert Hardware.from_json(again) == hw
    files = [f.name for f in tmp_path.glob("hardware-*.json")]
    assert len(files) == 1 and files[0].endswith("-2ranks-2nodes-quick.json"), files


# --- the planner: a two-level network ----------------------------------------------------------------


def _network_a100(inter=10e9, latency=1e-5):
    from elixir.hardware import Hardware
    from elixir.search.cost import Network

    hw = Hardware.preset("A100-80GB").with_network(inter_node_bytes_per_s=inter, inter_node_latency_s=latency)
    return hw, Network(hw, world_size=16, nodes=2)


def test_world_sharding_pays_the_inter_node_link_for_every_gather_and_reduce_scatter():
    from elixir.search.cost import _Chunk

    hw, net = _network_a100()
    chunk = _Chunk(0, ("w",), 16_000_000, False, "device", "device", ranks=16)
    # 15/16 of 32 MB (bf16) at the node's 10 GB/s shared by its 8 GPUs (1.25 GB/s each, below NVSwitch's
    # 230 GB/s), and 15 ring steps of 10 us
    assert net.gather_s(chunk, 32_000_000) == pytest.approx(30e6 / 1.25e9 + 15 * 1e-5)
    # the gradient: the same over the fp32 chunk, and nothing else
    assert net.reduce_s(chunk) == pytest.approx(60e6 / 1.25e9 + 15 * 1e-5)
    assert net.reduce_collectives(chunk) == 1


def test_node_sharding_gathers_inside_the_node_and_all_reduces_the_shard_across():
    from elixir.search.cost import _Chunk

    hw, net = _network_a100()
    chunk = _Chunk(0, ("w",), 16_000_000, False, "device", "device", ranks=8, replicas=2)
    # 7/8 of 32 MB over NVSwitch (230 GB/s, no latency in the preset)
    assert net.gather_s(chunk, 32_000_000) == pytest.approx(28e6 / 230e9)
    # reduce-scatter inside (7/8 of 64 MB at 230 GB/s), then the all-reduce of the 8 MB fp32 shard over 2 nodes:
    # 2 (2-1)/2 x 8 MB at 1.25 GB/s, in 2 ring steps of 10 us
    assert net.reduce_s(chunk) == pytest.approx(56e6 / 230e9 + 8e6 / 1.25e9 + 2 * 1e-5)
    assert net.reduce_collectives(chunk) == 2


def test_one_level_hardware_prices_a_collective_over_nodes_as_before():
    from elixir.hardware import Hardware
    from elixir.search.cost import Network, _Chunk

    hw = Hardware.preset("A100-80GB")  # no inter-node figure: the preset's rate for 16 GPUs, 20 GB/s
    chunk = _Chunk(0, ("w",), 16_000_000, False, "device", "device", ranks=16)
    assert Network(hw, world_size=16, nodes=2).gather_s(chunk, 32_000_000) == pytest.approx(30e6 / 20e9)
    assert Network(hw, world_size=16, nodes=1).gather_s(chunk, 32_000_000) == pytest.approx(30e6 / 20e9)


def test_inter_node_links_are_read_by_name_or_line_rate():
    from elixir.hardware import Hardware, parse_link

    assert parse_link("100Gbps") == (100e9 / 8 * 0.8, 10e-6)
    assert parse_link("4x200Gbps") == (4 * 200e9 / 8 * 0.8, 10e-6)
    assert parse_link("4xib-hdr-200g") == (4 * 200e9 / 8 * 0.9, 3e-6)
    with pytest.raises(ValueError, match="'25GB/s'.*gigabits"):
        parse_link("25GB/s")
    hw = Hardware.preset("H100-80GB").with_network(inter_node_bytes_per_s=5e10, inter_node_latency_s=3e-6)
    assert Hardware.from_json(hw.to_json()) == hw
    old = json.loads(Hardware.preset("H100-80GB").to_json())
    for key in ("intra_node_latency_s", "inter_node_bytes_per_s", "inter_node_latency_s"):
        del old[key]  # a cache written before the two-level network still reads, as one level
    assert Hardware.from_json(json.dumps(old)) == Hardware.preset("H100-80GB")


def test_the_search_shards_inside_nodes_when_the_link_between_them_is_slow():
    from elixir.hardware import Hardware
    from elixir.search import search

    model = _model()
    x = batches(1)[0]
    prof = elixir.profile(model, {"input_ids": x, "labels": x})
    slow = Hardware.preset("A100-80GB").with_network(inter_node_bytes_per_s=1e6, inter_node_latency_s=1e-3)
    plan, pred = search(prof, slow, world_size=4, nodes=2)
    assert plan.nodes == 2 and {c.shard_over for c in plan.chunks} == {"node"}
    world, world_pred = search(prof, slow, world_size=4, nodes=2, shard_over="world")
    assert {c.shard_over for c in world.chunks} == {"world"} and world_pred.step_s > pred.step_s
    assert elixir.Plan.from_json(plan.to_json()) == plan


def test_the_search_mixes_layouts_when_the_host_has_no_room_for_every_node_shard():
    from elixir.hardware import Hardware
    from elixir.search import PlanDoesNotFitError, search
    from elixir.search.search import DEVICE_MARGIN, HOST_MARGIN

    model = _model()
    x = batches(1)[0]
    prof = elixir.profile(model, {"input_ids": x, "labels": x})
    params = sum(p.numel() for p in model.parameters())
    slow = Hardware.preset("A100-80GB").with_network(inter_node_bytes_per_s=1e6, inter_node_latency_s=1e-3)
    # the device holds the activations and 6 bytes per parameter, the host 4: every chunk sharded inside the
    # nodes does not fit, every chunk over the world does, and waits on the slow link
    tight = dataclasses.replace(slow, device_bytes=int((prof.peak_activation_bytes + 6 * params) / DEVICE_MARGIN),
                                host_bytes=int(4 * params / HOST_MARGIN))
    with pytest.raises(PlanDoesNotFitError):
        search(prof, tight, world_size=4, nodes=2, shard_over="node")
    world, world_pred = search(prof, tight, world_size=4, nodes=2, shard_over="world")
    plan, pred = search(prof, tight, world_size=4, nodes=2)
    assert {c.shard_over for c in plan.chunks} == {"world", "node"}
    assert pred.step_s < world_pred.step_s
    assert elixir.Plan.from_json(plan.to_json()) == plan


@pytest.mark.slow
def test_elixir_plan_prints_the_layout_it_chose(capsys):
    from elixir.cli import main

    assert main(["plan", "--model", "gpt2", "--gpu", "A100-80GB", "--nodes", "2", "--gpus", "8",
                 "--inter-node", "100Gbps", "--seq-len", "256"]) == 0
    text = capsys.readouterr().out
    assert "2 x 8 x A100-80GB" in text and "16 rank(s) on 2 nodes" in text
    assert "chosen by the search; 10.0 GB/s per node between nodes" in text


def test_slurm_tasks_read_as_torchrun_ranks():
    from elixir.comm import slurm_environment

    env = dict(SLURM_PROCID="11", SLURM_NTASKS="16", SLURM_LOCALID="3", SLURM_TASKS_PER_NODE="8(x2)",
               SLURM_NODEID="1", MASTER_ADDR="node-a", MASTER_PORT="29500")
    got = slurm_environment(env)
    assert got == dict(RANK="11", WORLD_SIZE="16", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8", GROUP_RANK="1")
    layout = node_layout_from_env(16, 11, got)
    assert (layout.nodes, layout.ranks_per_node, layout.node_rank, layout.local_rank) == (2, 8, 1, 3)
    with pytest.raises(ValueError, match="needs MASTER_ADDR and MASTER_PORT.*scontrol show hostnames"):
        slurm_environment({k: v for k, v in env.items() if not k.startswith("MASTER")})
