"""Mixture-of-Experts under expert parallelism trains exactly like one process on the global batch.

Several ranks (gloo, spawned here) run the MoE reference GPT and a tiny Hugging Face Mixtral with their
experts spread by `elixir.parallel.expert_parallel`; every rank trains on its rows of the global batch,
and the losses and parameters after 5 AdamW steps must match one process training the same model on the
whole batch, within the relative 1e-5 of tests/test_distributed.py (whose docstring says why eps=1e-6 and
lr=1e-3). Routing is dropless (see [Note: dropless routing] in elixir/parallel/moe.py), so expert
parallelism changes where the arithmetic happens, not what it computes.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from dist import run_ranks, train_one_process, train_ranks

import elixir
from elixir.models import GPT, GPTConfig
from elixir.parallel import ExpertParallel, check_expert_parallel, expert_parallel, patterns_of
from helpers import VOCAB, assert_close_rel, assert_params_close, batches, loss_of, small_chunk_mib

STEPS = 5
EPS = 1e-6
LR = 1e-3
EXPERTS = 4


def moe_gpt(top_k: int = 2) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.preset(
        "tiny", vocab_size=VOCAB, bias=False, n_experts=EXPERTS, top_k=top_k, expert_hidden=32, moe_aux_weight=0.1
    )
    return GPT(cfg).train()


def tiny_mixtral():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
    )
    return tf.MixtralForCausalLM(cfg).train()


def tiny_olmoe():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OlmoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.0,
    )
    return tf.OlmoeForCausalLM(cfg).train()


BUILDERS = {"gpt1": lambda: moe_gpt(1), "gpt2": lambda: moe_gpt(2), "mixtral": tiny_mixtral, "olmoe": tiny_olmoe}


def make_plan(model, kind: str, optimizer) -> elixir.Plan:
    """resident: every chunk gathered on the device; experts_host: dense chunks resident, expert chunks
    gathered on demand with their shards and optimizer on the host; host: every chunk so."""
    mib = small_chunk_mib(model)
    if kind == "resident":
        return elixir.Plan.uniform(model, chunk_mib=mib, resident=True, optimizer=optimizer)
    host = elixir.Plan.uniform(
        model,
        chunk_mib=mib,
        cache_blocks=2,
        resident=False,
        param_home="host",
        optim_home="host",
        optimizer=optimizer,
    )
    if kind == "host":
        return host
    assert kind == "experts_host"
    expert_names = {n for n, p in model.named_parameters() if id(p) in patterns_of(model) or p.dim() == 3}
    chunks = [
        c
        if set(c.params) <= expert_names
        else dataclasses.replace(c, resident=True, param_home="device", optim_home="device")
        for c in host.chunks
    ]
    assert any(not c.resident for c in chunks) and any(c.resident for c in chunks)
    return dataclasses.replace(host, chunks=tuple(chunks))


# AdamW is nearly blind to a gradient's scale, so parameters alone would hardly see experts' gradients
# reduced with the wrong divisor (see [Note: expert gradient scale]): the gradient norm is compared too, by
# clip_grad_norm_ with a bound never reached (it scales by exactly 1).
NO_CLIP = 1e9


def train_expert_parallel(model, data, rank, world, ep_size, kind, clip=NO_CLIP, micro_batches=1):
    kind, _, checkpointing = kind.partition("+")
    m = expert_parallel(copy.deepcopy(model), ep_size)
    if checkpointing:  # blocks recompute in backward: their all-to-alls run again there, on every rank alike
        m.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
    m, opt = elixir.wrap(m, opt, plan=make_plan(m, kind, opt))
    losses, norms = train_ranks(m, opt, data, rank, world, micro_batches=micro_batches, clip=clip)
    return losses, elixir.full_state_dict(m), norms, m


def _parity(rank, world, family, cases):
    model = BUILDERS[family]()
    data = batches(STEPS, batch=8)
    ref_losses, ref_params, ref_norms = train_one_process(model, data, lr=LR, eps=EPS, clip=NO_CLIP)
    for ep_size, kind in cases:
        losses, params, norms, _ = train_expert_parallel(model, data, rank, world, ep_size, kind)
        assert_close_rel(losses, ref_losses, 1e-5)
        assert_close_rel(norms, ref_norms, 1e-5)
        assert_params_close(params, ref_params, 1e-5)


@pytest.mark.dist
@pytest.mark.parametrize(
    "world,family,cases",
    [
        (2, "gpt2", [(2, "resident"), (2, "experts_host"), (1, "resident")]),
        (2, "gpt1", [(2, "host"), (2, "experts_host+checkpointing")]),
        (4, "gpt2", [(2, "resident"), (4, "resident"), (4, "experts_host"), (2, "host")]),
    ],
)
def test_moe_gpt_matches_one_process(world, family, cases):
    run_ranks(_parity, world, family, cases)


@pytest.mark.dist
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_hf_moe_matches_hf_training(family):
    # the reference is the untouched Hugging Face model on one process, with its own experts forward
    run_ranks(_parity, 2, family, [(2, "resident"), (2, "experts_host")])


def _clip(rank, world):
    model = moe_gpt()
    data = batches(STEPS, batch=8)
    _, ref_params, ref_norms = train_one_process(model, data, lr=LR, eps=EPS, clip=0.5)
    # two micro-batches per step: expert gradients accumulate before the reduction like dense ones
    _, params, norms, _ = train_expert_parallel(model, data, rank, world, 2, "resident", clip=0.5, micro_batches=2)
    # the norm counts every expert once: over all ranks, not over one chunk group
    assert_close_rel(norms, ref_norms, 1e-5)
    assert_params_close(params, ref_params, 1e-5)


@pytest.mark.dist
def test_clip_grad_norm_and_accumulation_count_every_expert_once():
    run_ranks(_clip, 4)


def _memory(rank, world, ep_size):
    model = moe_gpt()
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = expert_parallel(copy.deepcopy(model), ep_size)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS, fused=True)
    m, opt = elixir.wrap(m, opt, plan=make_plan(m, "host", opt))
    loss_of(m, batches(1, batch=world * 2)[0].chunk(world)[rank]).backward()
    opt.step()
    opt.zero_grad()
    rt = elixir.runtime_of(m)
    expert_numel = sum(t.numel() for n, t in full.items() if t.dim() == 3)
    dense_numel = sum(t.numel() for n, t in full.items() if t.dim() != 3)
    edp = world // ep_size
    per = EXPERTS // ep_size
    lo = (rank % ep_size) * per
    expert_chunks = [c for c in rt.chunks if c.slots[0].param.dim() == 3]
    dense_chunks = [c for c in rt.chunks if c.slots[0].param.dim() != 3]
    for c in expert_chunks:  # experts: sharded over the ranks holding the same experts, never mixed
        assert c.group.size == edp and c.group.grad_divisor == world
        assert all(s.param.dim() == 3 and s.shape[0] == per for s in c.slots)
    for c in dense_chunks:
        assert c.group.size == world and all(s.param.dim() != 3 for s in c.slots)
    # this rank's expert shards hold its own experts: rank i of an expert-parallel group, experts lo..lo+per
    for c in expert_chunks:
        full_chunk = torch.empty(c.numel)
        elixir.comm.all_gather(full_chunk, c.shard.float(), c.group)
        for s in c.slots:
            want = full[s.name][lo : lo + per]
            got = full_chunk[s.offset : s.offset + s.numel].view(s.shape)
            assert torch.allclose(got, want, rtol=1e-2, atol=1e-3)  # one AdamW step of lr 1e-3 apart
    # host holds fp32 shard (its own master) + AdamW's two states, of the experts' and the dense shards, and
    # the fp32 gradient buffers kept from step to step of chunks whose gradient was copied (a group of one)
    stats = elixir.memory_stats(m)
    shard_numel = sum(c.numel // c.group.size for c in rt.chunks)
    assert stats["host_grad_bytes"] == 4 * sum(c.numel for c in rt.chunks if c.group.size == 1)
    assert stats["host_bytes"] - stats["host_grad_bytes"] == 3 * 4 * shard_numel
    # against the model: the local experts (1/ep of them) over world/ep ranks, the dense ones over the world,
    # plus at most group-size - 1 elements of padding and 16 of alignment per parameter
    ideal = expert_numel * per // EXPERTS // edp + dense_numel // world
    slack = len(rt.chunks) * world + 16 * len(full)
    assert ideal <= shard_numel <= ideal + slack, (shard_numel, ideal)


@pytest.mark.dist
@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2)])
def test_each_rank_holds_its_experts_and_a_share_of_the_dense_chunks(world, ep_size):
    run_ranks(_memory, world, ep_size)


def test_ep_size_must_divide_experts_and_world():
    with pytest.raises(ValueError, match=r"ep_size=3 does not divide the number of experts \(8\).*one of \[1, 2, 4\]"):
        check_expert_parallel(8, 3, 4)
    with pytest.raises(ValueError, match=r"ep_size=4 does not divide the world size \(6 ranks\).*one of \[1, 2\]"):
        check_expert_parallel(8, 4, 6)
    # one process: only ep_size 1 divides the world; nothing is changed before the error
    model = moe_gpt()
    before = [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match=r"ep_size=2 does not divide the world size \(1 ranks\)"):
        expert_parallel(model, 2)
    assert [p.shape for p in model.parameters()] == before
    with pytest.raises(ValueError, match="no experts module"):
        expert_parallel(GPT(GPTConfig.preset("tiny")), 1)


def test_ep_size_one_is_the_same_model():
    model = moe_gpt()
    assert expert_parallel(model, 1) is model and not patterns_of(model)
    assert ExpertParallel.__name__ == "ExpertParallel"


def test_moe_config_errors():
    with pytest.raises(ValueError, match="top_k=3"):
        GPTConfig.preset("tiny", n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="n_experts=-1"):
        GPTConfig.preset("tiny", n_experts=-1)


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--experts", "4", "--ep-size", "3"], "ep_size=3 does not divide the number of experts (4)"),
        (["--experts", "4", "--ep-size", "2"], "ep_size=2 does not divide the world size (1 ranks)"),
        (["--experts", "2", "--top-k", "3"], "--top-k 3 exceeds --experts 2"),
        (["--ep-size", "2"], "--ep-size 2 spreads experts over ranks"),
    ],
)
def test_train_flags_are_checked(flags, named, capsys):
    from elixir.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "tiny", "--steps", "1", "--quiet", *flags])
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_train_moe_one_process():
    from elixir.cli import main

    assert (
        main(
            [
                "train",
                "--model",
                "tiny",
                "--experts",
                "4",
                "--top-k",
                "1",
                "--steps",
                "2",
                "--quiet",
                "--eval-every",
                "0",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )


def _planned(rank, world, ep_size):
    from elixir.hardware import Hardware

    model = expert_parallel(moe_gpt(), ep_size)
    x = batches(1, batch=8)[0].chunk(world)[rank]
    batch = {"input_ids": x, "labels": x}
    roomy = Hardware.preset("A100-80GB")
    peak = elixir.plan(model, batch, hardware=roomy).predicted["device_bytes_peak"]
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    # all resident, then a device too small for that: the optimizer of some chunks goes to the host
    for hw in (roomy, roomy.with_memory(device_bytes=int(0.8 * peak / 0.9))):
        plan = elixir.plan(model, batch, hardware=hw)
        assert plan.group_sizes == dict.fromkeys(experts, world // ep_size)
        assert elixir.Plan.from_json(plan.to_json()) == plan
        assert all(set(c.params) <= experts or not set(c.params) & experts for c in plan.chunks)
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS)
        m, opt = elixir.wrap(m, opt, plan=plan)
        for _ in range(2):
            loss_of(m, x).backward()
            opt.step()
            opt.zero_grad()
        stats = elixir.memory_stats(m)
        # the cost model counts expert chunks over their own group: its model data is the runtime's, exactly
        assert plan.predicted["model_device_bytes"] == stats["device_bytes_peak"]
        assert plan.predicted["model_host_bytes"] == stats["host_bytes_peak"]
    assert any(c.optim_home == "host" for c in plan.chunks)
    # the all-to-alls, routing balanced: per block dispatch and combine, and their two in backward, each
    # sending the (ep-1)/ep of this rank's tokens * top_k rows that leave it
    prof = elixir.profile(model, batch)
    sent = x.numel() * 2 * model.config.n_embd * 4 * (ep_size - 1) // ep_size
    assert prof.all_to_all == [(ep_size, sent)] * (4 * model.config.n_layer)
    assert plan.predicted["all_to_all_s"] > 0
    # a plan made without expert parallelism does not fit the expert-parallel model
    dense_plan = elixir.Plan.uniform(moe_gpt(), world_size=world)
    with pytest.raises(ValueError, match="another expert-parallel layout"):
        dense_plan.check_model(model, world)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_planner_predicts_the_memory_of_expert_parallel_chunks(world):
    run_ranks(_planned, world, 2)


def _wrapped(ep_size, kind):
    m = expert_parallel(moe_gpt(), ep_size)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, eps=EPS)
    return elixir.wrap(m, opt, plan=make_plan(m, kind, opt))


def _save_and_resume(rank, world, path):
    data = batches(4, batch=8)
    m, opt = _wrapped(2, "experts_host")
    train_ranks(m, opt, data[:2], rank, world)
    elixir.checkpoint.save(m, opt, path)
    after = train_ranks(m, opt, data[2:], rank, world)[0]
    values = elixir.full_state_dict(m)
    m2, opt2 = _wrapped(2, "experts_host")
    elixir.checkpoint.load(m2, opt2, path)
    assert train_ranks(m2, opt2, data[2:], rank, world)[0] == after  # the same world: bit for bit
    if rank == 0:
        torch.save((after, values), path + ".expected.pt")


@pytest.mark.dist
def test_checkpoints_name_every_expert_once_and_reshard(tmp_path):
    # 4 ranks, ep_size 2: each expert's shards on 2 ranks; loaded by one process holding every expert
    path = str(tmp_path / "ckpt")
    run_ranks(_save_and_resume, 4, path)
    after, values = torch.load(path + ".expected.pt")
    m, opt = _wrapped(1, "resident")
    elixir.checkpoint.load(m, opt, path)
    assert_close_rel(train_ranks(m, opt, batches(4, batch=8)[2:], 0, 1)[0], after, 1e-5)
    assert_params_close(elixir.full_state_dict(m), values, 1e-5)
