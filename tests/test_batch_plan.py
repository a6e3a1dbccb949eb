"""The planner chooses the batch too: profiles scaled to other micro-batches, activation checkpointing of every
k-th block, the search over micro-batch, accumulation and checkpointing, and `elixir plan --tokens-per-step`."""

import copy
import dataclasses
import json

import pytest
import torch

import elixir
from elixir.cli import main
from elixir.hardware import Hardware
from elixir.models import GPT, GPTConfig, apply_checkpointing
from elixir.models.checkpointing import checkpointed_blocks, checkpointing, transformer_blocks
from elixir.search import PlanDoesNotFitError, search, simulate
from elixir.search.api import plan_batch
from helpers import VOCAB, assert_params_close, build, loss_of, tiny_hf

SEQ = 32


def ids(batch: int, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def profile_of(model, batch: int, seq: int = SEQ):
    x = ids(batch, seq)
    return elixir.profile(model, {"input_ids": x, "labels": x})


# ---- scaling a profile to another micro-batch ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_scaled_profile_against_real_profiles(family):
    """Tolerance: FLOPs scale exactly (linear in the sequences at a fixed length). Bytes are a * sequences + c
    per storage, and scaling multiplies the batch-independent c too (position ids, masks, a parameter's gradient
    before it becomes .grad), so a profile scaled by f states f - 1 times c too much at every operator, exactly,
    and never too little. From 2 sequences (the same operators as 4 and 8) that is checked operator by operator;
    from 1 sequence, which these models run with fewer copies, on the totals."""
    model = build(family)
    p1, p2, p4, p8 = (profile_of(model, b) for b in (1, 2, 4, 8))
    assert [op.name for op in p2.ops] == [op.name for op in p8.ops]
    scaled = p2.scaled(4)
    assert [op.flops for op in scaled.ops] == [op.flops for op in p8.ops]
    assert (scaled.forward_flops, scaled.backward_flops, scaled.total_flops) == (
        p8.forward_flops, p8.backward_flops, p8.total_flops)
    # the batch-independent bytes at every operator, from two real profiles: c = 2 * bytes(2) - bytes(4)
    fixed = [2 * a.live_activation_bytes - b.live_activation_bytes for a, b in zip(p2.ops, p4.ops)]
    fixed_out = [2 * a.out_bytes - b.out_bytes for a, b in zip(p2.ops, p4.ops)]
    assert min(fixed) >= 0 and min(fixed_out) >= 0
    assert [s.live_activation_bytes - r.live_activation_bytes for s, r in zip(scaled.ops, p8.ops)] == [
        3 * c for c in fixed]
    assert [s.out_bytes - r.out_bytes for s, r in zip(scaled.ops, p8.ops)] == [3 * c for c in fixed_out]
    assert 0 <= scaled.peak_activation_bytes - p8.peak_activation_bytes <= 3 * max(fixed)
    # what does not grow with the batch stays
    assert [op.params for op in scaled.ops] == [op.params for op in p2.ops]
    assert [op.live_grad_bytes for op in scaled.ops] == [op.live_grad_bytes for op in p2.ops]
    assert scaled.grad_arrivals == p2.grad_arrivals and scaled.peak_grad_bytes == p2.peak_grad_bytes
    # from one sequence, as the planner scales: FLOPs exact, the peak over by at most 7 c
    from_one = p1.scaled(8)
    assert from_one.total_flops == p8.total_flops
    assert 0 <= from_one.peak_activation_bytes - p8.peak_activation_bytes <= 7 * max(fixed)
    assert p1.scaled(1).peak_activation_bytes == p1.peak_activation_bytes


def test_scaled_rejects_a_bad_factor():
    prof = profile_of(build("gpt"), 1)
    for bad in (0, -2, float("nan"), True):
        with pytest.raises(ValueError, match="factor="):
            prof.scaled(bad)


# ---- activation checkpointing of every k-th block ---------------------------------------------------------------

def four_block_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, n_layer=4)).train()


def four_layer_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).train()


def forwards_in_backward(model) -> list[int]:
    """How many times each block's MLP runs during backward: once for a checkpointed block (recomputed)."""
    blocks = transformer_blocks(model)
    counts = [0] * len(blocks)
    in_backward = [False]
    # a pre-hook: recomputation stops as soon as the last tensor backward needs is made, inside the MLP
    hooks = [b.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + in_backward[0]))
             for i, b in enumerate(blocks)]
    x = ids(2)
    loss = loss_of(model, x)
    in_backward[0] = True
    loss.backward()
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("make", [four_block_gpt, four_layer_llama], ids=["gpt", "llama"])
def test_apply_checkpointing_recomputes_the_right_blocks(make):
    model = make()
    assert forwards_in_backward(model) == [0, 0, 0, 0]
    reference = copy.deepcopy(model)
    x = ids(2)
    want = loss_of(reference, x)
    want.backward()
    for every, recomputed in ((1, [1, 1, 1, 1]), (2, [1, 0, 1, 0]), (3, [1, 0, 0, 1]), (0, [0, 0, 0, 0])):
        apply_checkpointing(model, every)
        assert checkpointed_blocks(model) == [i for i, r in enumerate(recomputed) if r]
        assert forwards_in_backward(model) == recomputed
        model.zero_grad()
        got = loss_of(model, x)
        got.backward()
        assert torch.equal(got, want)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
    # the same parameter names: plans and checkpoints made without checkpointing still apply
    apply_checkpointing(model, 2)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    # the context manager puts back what the model had
    with checkpointing(model, 1):
        assert checkpointed_blocks(model) == [0, 1, 2, 3]
    assert checkpointed_blocks(model) == [0, 2]


def test_apply_checkpointing_replaces_the_gpts_own_switch():
    model = four_block_gpt()
    model.gradient_checkpointing_enable()
    assert checkpointed_blocks(model) == [0, 1, 2, 3]
    apply_checkpointing(model, 2)
    assert checkpointed_blocks(model) == [0, 2] and forwards_in_backward(model) == [1, 0, 1, 0]


def test_apply_checkpointing_errors():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    apply_checkpointing(plain, 0)  # nothing to turn off: fine
    with pytest.raises(ValueError, match="no transformer blocks found in Sequential"):
        apply_checkpointing(plain, 2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="every="):
            apply_checkpointing(four_block_gpt(), bad)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_wrap_applies_the_plans_checkpointing_and_training_matches_pytorch(family):
    torch.manual_seed(0)
    model = four_block_gpt() if family == "gpt" else tiny_hf("llama").train()
    data = [ids(4, 16, seed=s) for s in range(3)]
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    want = []
    for x in data:
        loss = loss_of(ref, x)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        want.append(loss.item())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    # chunks of up to three of the largest parameter, on demand: a recomputed block needs its three or four
    # chunks gathered at once (more cache blocks than without checkpointing), and the rest are evicted
    numel = max(p.numel() for p in model.parameters())
    plan = elixir.Plan.uniform(model, chunk_mib=3 * numel * 4 / 2**20, cache_blocks=4, resident=False, optimizer=opt)
    assert len(plan.chunks) > 4
    plan = dataclasses.replace(plan, checkpoint_every=2)
    model, opt = elixir.wrap(model, opt, plan=plan)
    assert checkpointed_blocks(model) == [i for i in range(len(transformer_blocks(model))) if i % 2 == 0]
    got = []
    for x in data:
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        got.append(loss.item())
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    assert_params_close(elixir.full_state_dict(model), ref_params, rel=1e-5)


# ---- the search over the batch ----------------------------------------------------------------------------------

def gpu_with(device_bytes: int) -> Hardware:
    return Hardware.preset("A100-80GB").with_memory(device_bytes=device_bytes)


@pytest.fixture(scope="module")
def gpt_profiles():
    """A GPT of 4 blocks at one sequence of 64 tokens, with each checkpointing option."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=64, block_size=64)).train()
    x = ids(1, 64)
    out = {}
    for every in (0, 2, 1):
        with checkpointing(model, every):
            out[every] = elixir.profile(model, {"input_ids": x, "labels": x})
    return out


def batch_search(profiles, hw, tokens, **kw):
    return search(profiles[0], hw, tokens_per_step=tokens, seq_len=64,
                  checkpoint_profiles={2: profiles[2], 1: profiles[1]}, **kw)


def test_the_search_trades_accumulation_and_checkpointing_for_device_memory(gpt_profiles):
    tokens = 16 * 64  # 16 sequences per step
    roomy, roomy_pred = batch_search(gpt_profiles, gpu_with(80 * 2**30), tokens)
    assert (roomy.micro_batch_size, roomy.grad_accum, roomy.checkpoint_every) == (16, 1, 0)
    chosen = []
    # shrink the device to what the activations of fewer and fewer sequences take beside the model data
    per_sequence = gpt_profiles[0].peak_activation_bytes
    for sequences in (16, 1, 0.5, 0.25):
        device = int((roomy_pred.model_device_bytes + sequences * per_sequence) / 0.9)
        plan, pred = batch_search(gpt_profiles, gpu_with(device), tokens)
        assert plan.micro_batch_size * plan.grad_accum == 16
        assert pred.device_bytes_peak <= device * 0.9
        assert plan.overlap
        # the prediction is that of the plan: a step of grad_accum micro-batches of the scaled profile
        micro = (gpt_profiles[plan.checkpoint_every]).scaled(plan.micro_batch_size)
        assert simulate(micro, plan, gpu_with(device)).step_s == pytest.approx(pred.step_s)
        if plan.checkpoint_every and not all(c.resident for c in plan.chunks):  # room for a recomputed block
            from elixir.search.search import _checkpointed_regions

            chunk_of = {n: i for i, c in enumerate(plan.chunks) for n in c.params}
            regions = _checkpointed_regions(list(chunk_of), plan.checkpoint_every)
            assert plan.cache_blocks >= max(len({chunk_of[n] for n in r}) for r in regions)
        chosen.append((plan.grad_accum, plan.checkpoint_every, pred.step_s))
    accum = [c[0] for c in chosen]
    assert accum == sorted(accum) and accum[0] == 1 and accum[-1] > 1  # more accumulation as the device shrinks
    assert chosen[0][1] == 0 and any(c[1] for c in chosen)  # checkpointing only once memory is short
    steps = [c[2] for c in chosen]
    assert steps == sorted(steps)  # less memory never makes a step faster


def test_the_search_without_tokens_per_step_is_as_before(gpt_profiles):
    hw = gpu_with(80 * 2**30)
    plan, pred = search(gpt_profiles[0], hw)
    assert (plan.micro_batch_size, plan.grad_accum, plan.checkpoint_every) == (0, 1, 0)
    with pytest.raises(ValueError, match="only apply to a batch search"):
        search(gpt_profiles[0], hw, seq_len=64)


def test_batch_search_errors(gpt_profiles):
    hw = gpu_with(80 * 2**30)
    with pytest.raises(ValueError, match=r"tokens_per_step=100 is not a whole number .* multiple of 128"):
        search(gpt_profiles[0], hw, tokens_per_step=100, seq_len=64, world_size=2)
    with pytest.raises(ValueError, match="seq_len=None must be a positive int"):
        search(gpt_profiles[0], hw, tokens_per_step=128)
    # nothing fits: the least model data fits the device, but not beside the activations of one sequence with
    # every block checkpointed; the numbers say so
    from elixir.search.search import _Space

    def short_of(every: int) -> Hardware:
        least = _Space(hw, 1, "float32", 2, None).least_model_device_bytes(
            gpt_profiles[every], every)
        return gpu_with(int((least + gpt_profiles[every].peak_activation_bytes // 2) / 0.9))

    with pytest.raises(PlanDoesNotFitError, match=r"even at micro-batch 1 .* checkpointing of every block.*"
                       r"shorter sequences than 64 tokens: activations take [\d.]+ KiB"):
        batch_search(gpt_profiles, short_of(1), 64 * 8)
    # without checkpointed profiles, the advice is checkpointing
    with pytest.raises(PlanDoesNotFitError, match=r"activation checkpointing \(pass checkpoint_profiles"):
        search(gpt_profiles[0], short_of(0), tokens_per_step=64 * 8, seq_len=64)


def test_memory_without_replay_is_what_simulate_predicts(gpt_profiles):
    from elixir.search.search import _Space

    prof = gpt_profiles[1].scaled(4)
    base = elixir.Plan.uniform(GPT(GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=64, block_size=64)),
                               chunk_mib=0.05, cache_blocks=3, resident=False, compute_dtype="bf16")
    homes = [("device", "device"), ("host", "host"), ("host", "device"), ("device", "host")]
    for accum in (1, 3):
        chunks = tuple(dataclasses.replace(c, param_home=homes[i % 4][0], optim_home=homes[i % 4][1])
                       for i, c in enumerate(base.chunks))
        plan = dataclasses.replace(base, chunks=chunks, grad_accum=accum)
        for hw in (gpu_with(80 * 2**30), Hardware.preset("CPU")):
            want = simulate(prof, plan, hw)
            got = _Space(hw, 1, "bf16", 2, None).memory_only(prof, plan)
            assert (got.device_bytes_peak, got.host_bytes_peak) == (want.device_bytes_peak, want.host_bytes_peak)


def test_plan_api_chooses_the_batch_and_leaves_the_model_as_it_was():
    model = four_block_gpt()
    x = ids(3, SEQ)
    hw = gpu_with(80 * 2**30)
    plan = elixir.plan(model, {"input_ids": x, "labels": x}, hardware=hw, tokens_per_step=8 * SEQ)
    assert (plan.micro_batch_size, plan.grad_accum, plan.checkpoint_every) == (8, 1, 0)
    assert plan.use_order and plan.predicted["step_s"] > 0
    assert elixir.Plan.from_json(plan.to_json()) == plan
    assert checkpointed_blocks(model) == []
    # a device that holds the model data and about two sequences' activations: accumulation or checkpointing
    per_sequence = profile_of(model, 1).peak_activation_bytes
    small = gpu_with(int((plan.predicted["model_device_bytes"] + 2 * per_sequence) / 0.9))
    found = plan_batch(model, {"input_ids": x, "labels": x}, hardware=small, tokens_per_step=8 * SEQ)
    assert found.plan.grad_accum > 1 or found.plan.checkpoint_every
    assert found.prediction.device_bytes_peak <= small.device_bytes * 0.9 and found.profiles_traced >= 2
    assert checkpointed_blocks(model) == []
    assert found.profile.peak_activation_bytes == found.prediction.activation_bytes
    # the plan trains, checkpointing as it says
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = elixir.wrap(model, opt, plan=found.plan)
    assert checkpointed_blocks(model) == [i for i in range(4) if found.plan.checkpoint_every
                                          and i % found.plan.checkpoint_every == 0]
    for _ in range(found.plan.grad_accum):
        loss_of(model, x[:found.plan.micro_batch_size]).backward()
    opt.step()
    # the example batch must give a sequence length
    with pytest.raises(ValueError, match=r"\(batch, seq_len\) tensors"):
        elixir.plan(four_block_gpt(), {"input_ids": torch.zeros(4, dtype=torch.long)}, hardware=hw,
                    tokens_per_step=64)


# ---- elixir plan --tokens-per-step ------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_prints_the_chosen_batch(tmp_path, capsys):
    out = tmp_path / "plan.json"
    status = main(["plan", "--model", "gpt2", "--gpu", "A100-80GB", "--gpu-memory", "3GiB", "--seq-len", "256",
                   "--tokens-per-step", str(64 * 256), "--json", str(out)])
    assert status == 0
    text = capsys.readouterr().out
    plan = elixir.Plan.from_json(out.read_text())
    assert plan.micro_batch_size * plan.grad_accum == 64 and plan.grad_accum > 1
    assert f"micro-batch {plan.micro_batch_size}, {plan.grad_accum} accumulation step(s)" in text
    assert "TFLOPS by the profiled FLOPs" in text and "predicted step" in text
    data = json.loads(out.read_text())
    assert {"micro_batch_size", "grad_accum", "checkpoint_every", "overlap"} <= data.keys()


@pytest.mark.parametrize("argv, message", [
    (["--tokens-per-step", "4096", "--batch-size", "2"], "leave out --batch-size and --checkpointing"),
    (["--tokens-per-step", "4096", "--checkpointing"], "leave out --batch-size and --checkpointing"),
    (["--tokens-per-step", "1000", "--seq-len", "512"], "use a multiple of 512"),
])
def test_cli_batch_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "gpt2", "--gpu", "A100-80GB", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_opt_30b_plans_on_one_a100_40gb_with_and_without_a_batch_search(capsys, monkeypatch):
    """OPT-30B, 1 x A100-40GB, 512 GiB host: a fixed micro-batch of one sequence and 65536 tokens per step
    (32 sequences of 2048) both plan; on 1 x H200 with 128 GiB of host it needs a disk. One model, built once,
    serves all three."""
    from elixir.cli import plan as plan_cli
    from elixir.models.families import build_family

    model = build_family("opt-30b")
    monkeypatch.setattr(plan_cli, "build_family", lambda name: model)
    common = ["plan", "--model", "opt-30b", "--gpus", "1", "--gpu", "A100-40GB", "--host-memory", "512GiB",
              "--seq-len", "2048"]
    assert main(common) == 0
    assert "predicted step" in capsys.readouterr().out
    assert main([*common, "--tokens-per-step", "65536"]) == 0
    text = capsys.readouterr().out
    assert "65,536 tokens per step" in text and "accumulation step(s)" in text
    # 1 x H200 with 128 GiB of host and no disk: it does not fit, and the error names the scratch disk that
    # would, at the micro-batch where it does (one sequence with accumulation holds an fp32 gradient on host)
    h200 = ["plan", "--model", "opt-30b", "--gpus", "1", "--gpu", "H200", "--host-memory", "128GiB", "--seq-len",
            "2048", "--disk-memory", "0", "--tokens-per-step", "65536"]
    assert main(h200) != 0
    said = "".join(capsys.readouterr())
    assert "a scratch disk for the optimizer states" in said and "at micro-batch 32 x 1 accumulation step(s)" in said
    assert checkpointed_blocks(model) == []


def test_compute_floor_is_below_every_searched_step(gpt_profiles):
    """The floors that prune the batch search: the compute alone of a step, no plan of it faster."""
    from elixir.search.search import _Space

    hw = gpu_with(80 * 2**30)
    for every, prof in gpt_profiles.items():
        micro = prof.scaled(4)
        space = _Space(hw, 1, "float32", 2, None)
        floor = space.compute_floor_s(micro, 3)
        base = next(space._layouts(micro))
        one = simulate(micro, space._base(micro, base[0], base[1]), hw).compute_s
        assert floor == pytest.approx(3 * one)
        # the resident plan of 3 micro-batches also adds the later two's gradients into the first's, on the device
        resident = space._base(micro, base[0], base[1], grad_accum=3)
        assert floor < simulate(micro, resident, hw).compute_s < 1.01 * floor
        found, _, _ = space.place(micro, micro_batch_size=4, grad_accum=3, checkpoint_every=every)
        assert found[1].step_s >= floor
        tight = gpu_with(int(found[1].device_bytes_peak * 0.8 / 0.9))
        found, _, _ = _Space(tight, 1, "float32", 2, None).place(micro, micro_batch_size=4, grad_accum=3,
                                                                         checkpoint_every=every)
        assert found[1].step_s >= floor


@pytest.mark.parametrize("make", [four_block_gpt, four_layer_llama], ids=["gpt", "llama"])
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_plans_get_a_cache_for_a_whole_recomputed_block(make, every):
    """The runtime keeps a recomputed block's chunks gathered until its backward has run: the search gives a
    checkpointed plan at least that many cache blocks, and that many are enough (with one fewer the cache
    grows to that many during the first backward, with a warning, so that the step finishes)."""
    from elixir.search.search import _checkpointed_regions

    model = make()
    numel = max(p.numel() for p in model.parameters())
    plan = elixir.Plan.uniform(model, chunk_mib=3 * numel * 4 / 2**20, cache_blocks=1, resident=False)
    chunk_of = {n: i for i, c in enumerate(plan.chunks) for n in c.params}
    regions = _checkpointed_regions([n for n, _ in model.named_parameters()], every)
    assert len(regions) == len(range(0, 4, every))
    need = max(len({chunk_of[n] for n in r}) for r in regions)
    assert need < len(plan.chunks)
    for blocks in (need - 1, need):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m, opt = elixir.wrap(m, opt, plan=dataclasses.replace(plan, cache_blocks=blocks, checkpoint_every=every))
        if blocks < need:
            with pytest.warns(UserWarning, match="activation checkpointing: a recomputed region"):
                loss_of(m, ids(2)).backward()
            assert elixir.memory_stats(m)["cache_blocks"] == need
        else:
            loss_of(m, ids(2)).backward()
            opt.step()
