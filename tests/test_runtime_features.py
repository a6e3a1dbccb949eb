"""Runtime mechanisms, each against plain PyTorch: eviction between forward and backward,
activation checkpointing, parameters used outside their module, frozen parameters, gradient
accumulation, clipping, lr schedulers, fp16 overflow, and the memory bounds of a plan."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elixir
from elixir.models import GPT, GPTConfig
from helpers import (
    VOCAB,
    assert_close_rel,
    assert_params_close,
    batches,
    build,
    loss_of,
    make_plan,
    train_elixir,
    train_reference,
)


def _wrap(model, kind, lr=1e-2, dtype=torch.float32, **kw):
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    return elixir.wrap(model, opt, plan=make_plan(model, kind, opt, dtype=dtype, **kw))


def test_every_chunk_evicted_between_forward_and_backward():
    """Saved views are rebuilt from chunks fetched back into other blocks; stale blocks are poisoned."""
    model = build("gpt")
    data = batches(4)
    ref_losses, ref_params = train_reference(model, data, 4)
    wrapped, opt = _wrap(model, "on_demand")
    rt = elixir.runtime_of(wrapped)
    losses = []
    for x in data:
        loss = loss_of(wrapped, x)
        before = {b.chunk.index: b.index for b in rt.cache.occupied()}
        rt.evict_all()
        assert rt.cache.num_used == 0
        for b in rt.cache.blocks:
            b.buffer.fill_(float("nan"))
        # hand blocks out in another order: chunks land in other blocks (the free blocks are a stack: taking
        # them all and giving them back in that order reverses it)
        taken = [rt.cache.take() for _ in range(rt.cache.num_blocks)]
        for block in taken:
            rt.cache.give_back(block)
        gathers = rt.gathers
        loss.backward()
        after = {b.chunk.index: b.index for b in rt.cache.occupied()}
        assert rt.gathers > gathers
        assert any(after.get(c) not in (None, b) for c, b in before.items()) or before.keys() != after.keys()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert_close_rel(losses, ref_losses, 1e-5)
    assert_params_close(elixir.full_state_dict(wrapped), ref_params, 1e-5)


@pytest.mark.parametrize("kind", ["on_demand", "host"])
def test_activation_checkpointing(kind):
    model = build("gpt")
    data = batches(4)
    ref_losses, ref_params = train_reference(model, data, 4)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    # a recomputed block keeps its chunks gathered until its backward has run: 6 of 12 chunks here
    losses, params, wrapped, plan = train_elixir(ckpt, data, 4, kind, cache_blocks=6)
    assert elixir.memory_stats(wrapped)["evictions"] > 0 and len(plan.chunks) > 6
    assert_close_rel(losses, ref_losses, 1e-5)
    assert_params_close(params, ref_params, 1e-5)


def test_checkpointing_with_too_small_a_cache_grows_it_and_finishes_the_step():
    """A recomputed block keeps its chunks gathered until its backward has run: 6 of them here, and the plan
    has 3 cache blocks. The step must not stop halfway through a backward: the cache grows (once, counted)
    with one warning naming the size to plan for, and training matches PyTorch."""
    model = build("gpt")
    data = batches(3)
    ref_losses, ref_params = train_reference(model, data, 3)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match="activation checkpointing: a recomputed region") as record:
        losses, params, wrapped, plan = train_elixir(ckpt, data, 3, "on_demand", cache_blocks=3)
    assert sum("recomputed region" in str(w.message) for w in record) == 1  # reported once
    stats = elixir.memory_stats(wrapped)
    assert plan.cache_blocks == 3 and stats["cache_blocks"] == 6
    block_bytes = elixir.runtime_of(wrapped).cache.blocks[0].buffer.nbytes
    assert stats["cache_bytes"] == 6 * block_bytes
    assert_close_rel(losses, ref_losses, 1e-5)
    assert_params_close(params, ref_params, 1e-5)


def test_the_planner_gives_a_checkpointed_model_a_cache_for_a_whole_block():
    """elixir.plan sees the model's own checkpointing and never plans fewer blocks than a recomputed block's
    chunks (on a device too small for everything resident)."""
    from elixir.hardware import Hardware
    from elixir.search.api import checkpointed_regions
    from elixir.search.search import DEVICE_MARGIN

    model = build("gpt")
    model.gradient_checkpointing_enable()
    x = batches(1, batch=8, seq=32)[0]
    batch = {"input_ids": x, "labels": x}
    roomy = elixir.plan(model, batch, hardware=Hardware.preset("CPU")).predicted
    # the activations and a quarter of the model data (the fp32 parameters alone): chunks go on demand
    tight = Hardware.preset("CPU").with_memory(
        device_bytes=int((roomy["activation_bytes"] + 0.25 * roomy["model_device_bytes"]) / DEVICE_MARGIN))
    plan = elixir.plan(model, batch, hardware=tight)
    assert any(not c.resident for c in plan.chunks)
    chunk_of = {n: i for i, c in enumerate(plan.chunks) for n in c.params}
    most = max(len({chunk_of[n] for n in region if not plan.chunks[chunk_of[n]].resident})
               for region in checkpointed_regions(model))
    assert plan.cache_blocks >= most


class Borrower(nn.Module):
    """Uses a sibling's weight inside its own forward: a use outside the owning module."""

    def __init__(self, lender: nn.Linear) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(lender.in_features))
        self.lender = [lender]  # not a submodule

    def forward(self, x):
        return F.linear(x, self.lender[0].weight.t()) * self.scale


class Outside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 48)
        self.mid = nn.Linear(48, 48)
        self.mid2 = nn.Linear(48, 48)
        self.out = Borrower(self.inp)  # 48 -> 16 through inp.weight transposed
        self.bias = nn.Parameter(torch.zeros(16))  # a parameter of the root, used in the root

    def forward(self, input_ids, labels=None):
        x = F.one_hot(input_ids % 16, 16).float()
        y = self.out(torch.relu(self.mid2(torch.relu(self.mid(torch.relu(self.inp(x))))))) + self.bias
        return type("Out", (), {"loss": F.cross_entropy(y.flatten(0, 1), labels.flatten() % 16)})


def test_parameter_used_outside_its_module():
    torch.manual_seed(0)
    model = Outside()
    data = batches(4)
    ref_losses, ref_params = train_reference(model, data, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    plan = elixir.Plan.uniform(model, chunk_mib=48 * 48 * 4 / 2**20 * 1.05, cache_blocks=2, resident=False,
                               optimizer=opt)
    assert len(plan.chunks) >= 3
    wrapped, opt = elixir.wrap(model, opt, plan=plan)
    losses = []
    for x in data:
        loss = loss_of(wrapped, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert elixir.memory_stats(wrapped)["evictions"] > 0
    assert_close_rel(losses, ref_losses, 1e-5)
    assert_params_close(elixir.full_state_dict(wrapped), ref_params, 1e-5)


@pytest.mark.parametrize("kind", ["on_demand", "mixed"])
def test_frozen_parameters(kind):
    model = build("gpt")
    for name, p in model.named_parameters():
        if name.startswith(("wpe", "h.0.")):
            p.requires_grad_(False)
    data = batches(4)
    ref_losses, ref_params = train_reference(model, data, 4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True)
    assert len(trainable) == sum(len(g["params"]) for g in opt.param_groups)
    wrapped, opt = elixir.wrap(m, opt, plan=make_plan(m, kind, opt))
    losses = []
    for x in data:
        loss = loss_of(wrapped, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert_close_rel(losses, ref_losses, 1e-5)
    params = elixir.full_state_dict(wrapped)
    assert_params_close(params, ref_params, 1e-5)
    assert torch.equal(params["wpe.weight"], model.wpe.weight.detach())  # untouched
    assert all(c.master is None for c in elixir.runtime_of(wrapped).chunks if not c.trainable)


@pytest.mark.parametrize("kind", ["resident", "host"])
def test_gradient_accumulation_equals_one_large_batch(kind):
    # SGD: the update is the gradient itself, so parameters compare gradients without Adam's
    # normalisation amplifying rounding noise in gradients that are zero in exact arithmetic
    model = build("gpt")
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    wrapped, opt = elixir.wrap(m, opt, plan=make_plan(m, kind, opt))
    for x in batches(3, batch=8):
        loss_of(ref, x).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for half in x.chunk(2):
            (loss_of(wrapped, half) / 2).backward()
        opt.step()
        opt.zero_grad()
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    assert_params_close(elixir.full_state_dict(wrapped), ref_params, 1e-5)


@pytest.mark.parametrize("kind", ["resident", "mixed"])
def test_clip_grad_norm_matches_torch(kind):
    # Bias-free: the key third of attention's bias has an exactly-zero true gradient (adding q.b_k to every
    # score of a row leaves the softmax unchanged), so its computed gradient is rounding noise (~1e-11) that
    # AdamW normalises into steps of ~lr * 1e-3. Elixir's norm sums chunk shards, torch's sums per-tensor
    # norms: the clip coefficients differ in their last bit, the noise after one step differs wholly, and
    # that bias would move by an amount set by the CPU's kernels (2.8e-4 relative on AVX2), not by Elixir.
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False)).train()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    wrapped, opt = _wrap(model, kind)
    for x in batches(3):
        for m in (ref, wrapped):
            loss_of(m, x).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        norm = opt.clip_grad_norm_(0.5)
        assert ref_norm > 0.5  # the clip really acts
        assert_close_rel(norm, ref_norm, 1e-5)
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    assert_params_close(elixir.full_state_dict(wrapped), ref_params, 1e-5)
    loss_of(wrapped, batches(1)[0]).backward()
    inf_norm = opt.clip_grad_norm_(1e9, norm_type=float("inf"))
    assert inf_norm > 0


@pytest.mark.parametrize("kind", ["resident", "mixed"])
def test_a_clip_that_does_not_act_leaves_the_gradients_alone(kind):
    # torch multiplies every gradient by the clamped coefficient, 1 where the norm is under the limit; Elixir has
    # waited for the norm already and skips that pass over the gradients when it would change nothing
    wrapped, opt = _wrap(build("gpt"), kind)
    loss_of(wrapped, batches(1)[0]).backward()
    opt.runtime.settle_backward()
    grads = [c.master.grad for c in opt.chunks if c.master.grad is not None]
    assert grads
    before, versions = [g.clone() for g in grads], [g._version for g in grads]
    norm = opt.clip_grad_norm_(1e9)
    assert 0 < norm.item() < 1e9
    assert [g._version for g in grads] == versions  # not written at all
    assert all(torch.equal(g, b) for g, b in zip(grads, before))
    half = opt.clip_grad_norm_(norm.item() / 2)  # this one acts: every gradient scaled by about one half
    assert_close_rel(half, norm, 1e-6)
    assert all(g._version > v for g, v in zip(grads, versions))
    coef = (norm.item() / 2) / (norm.item() + 1e-6)  # torch's formula; only fp32 rounding differs
    for g, b in zip(grads, before):
        torch.testing.assert_close(g, b * coef, rtol=1e-6, atol=0.0)


def test_lr_scheduler_works_unchanged():
    model = build("gpt")
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    wrapped, opt = _wrap(model, "host")
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ref_opt, opt)]
    for x in batches(4):
        for m, o, s in zip((ref, wrapped), (ref_opt, opt), sched):
            loss_of(m, x).backward()
            o.step()
            o.zero_grad()
            s.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    assert_params_close(elixir.full_state_dict(wrapped), ref_params, 1e-5)


def test_param_groups_keep_their_hyperparameters():
    model = build("gpt")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    ref = copy.deepcopy(model)
    groups = lambda m: [
        {"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.5},
        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": 3e-3},
    ]
    assert decay and no_decay
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, fused=True)
    opt = torch.optim.AdamW(groups(model), lr=1e-2, fused=True)
    plan = make_plan(model, "mixed")  # made without the optimizer: wrap splits mixed chunks
    wrapped, opt = elixir.wrap(model, opt, plan=plan)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    for c in elixir.runtime_of(wrapped).chunks:
        assert len({opt_group_of(opt, c)}) == 1
    for x in batches(3):
        for m, o in ((ref, ref_opt), (wrapped, opt)):
            loss_of(m, x).backward()
            o.step()
            o.zero_grad()
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    assert_params_close(elixir.full_state_dict(wrapped), ref_params, 1e-5)


def opt_group_of(opt, chunk):
    return next(i for i, g in enumerate(opt.param_groups) if any(m is chunk.master for m in g["params"]))


def test_fp16_overflow_skips_the_step():
    model = build("gpt")
    wrapped, opt = _wrap(model, "mixed", dtype=torch.float16)
    x = batches(1)[0]
    before = elixir.full_state_dict(wrapped)
    scale = opt.loss_scale
    opt.backward(loss_of(wrapped, x) * float("inf"))  # injected inf
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1
    assert opt.loss_scale == scale / 2
    after = elixir.full_state_dict(wrapped)
    for n in before:
        assert torch.equal(before[n], after[n]), n
    # the next, finite step updates
    opt.backward(loss_of(wrapped, x))
    opt.step()
    assert opt.skipped_steps == 1
    assert any(not torch.equal(before[n], v) for n, v in elixir.full_state_dict(wrapped).items())


def _device_bytes_allowed(plan, rt):
    """What a plan may hold on the device: resident chunks, device shards, the cache, device-side
    masters, gradient shards and AdamW's two states, and at most every chunk's fp32 gradient buffer."""
    total = 0
    block_bytes = plan.block_numel * plan.dtype.itemsize
    total += plan.cache_blocks * block_bytes if any(not c.resident for c in rt.chunks) else 0
    biggest = max(c.numel for c in rt.chunks)
    for c in rt.chunks:
        shard = c.shard_numel
        if c.resident:
            total += c.numel * c.dtype.itemsize
        elif c.param_home == "device":
            total += shard * c.dtype.itemsize
        if c.trainable:
            total += biggest * 4  # a pooled gradient buffer (the largest chunk's size)
            if c.optim_home == "device":
                total += shard * 4 * (3 if c.master is not c.shard else 2)
    return total


@pytest.mark.parametrize("kind", ["on_demand", "host"])
def test_fetch_bytes_count_the_shards_the_fetches_copied(kind):
    model, opt = _wrap(build("llama"), kind)
    rt = elixir.runtime_of(model)
    fetched = []  # the chunk of every gather, as the runtime makes it
    gather = rt._gather

    def counting(chunk, block, **kw):
        fetched.append(chunk)
        return gather(chunk, block, **kw)

    rt._gather = counting
    for x in batches(2):
        opt.backward(loss_of(model, x))
        opt.step()
        opt.zero_grad()
    stats = elixir.memory_stats(model)
    assert stats["gathers"] == len(fetched) > 0
    assert stats["fetch_bytes"] == sum(c.shard_numel * c.dtype.itemsize for c in fetched)


def test_a_fetch_binds_the_views_its_chunk_kept_of_that_block():
    """Every fetch leaves the parameters viewing the block it filled, at their offsets; a chunk fetched again into
    a block it filled before binds the views it made then (see [Note: views kept per block])."""
    model, opt = _wrap(build("llama"), "on_demand")
    rt = elixir.runtime_of(model)
    first_views, refetched = {}, 0
    gather = rt._gather

    def checking(chunk, block, **kw):
        nonlocal refetched
        kept = chunk.block_views.get(block)
        out = gather(chunk, block, **kw)
        base = block.buffer.data_ptr()
        for slot in chunk.slots:
            assert slot.param.data_ptr() == base + slot.offset * chunk.dtype.itemsize, slot.name
            assert slot.param.shape == slot.shape, slot.name
        views = chunk.block_views[block]
        if kept is not None:
            assert views is kept is first_views[chunk.index, block.index]
            refetched += 1
        first_views.setdefault((chunk.index, block.index), views)
        return out

    rt._gather = checking
    for x in batches(3):
        opt.backward(loss_of(model, x))
        opt.step()
        opt.zero_grad()
    assert refetched > 0 and len({b for _, b in first_views}) == elixir.memory_stats(model)["cache_blocks"]


@pytest.mark.parametrize("kind", ["resident", "on_demand", "host", "mixed"])
def test_memory_stays_within_the_plan(kind):
    model = build("llama")
    _, _, wrapped, plan = train_elixir(model, batches(3), 3, kind)
    stats = elixir.memory_stats(wrapped)
    rt = elixir.runtime_of(wrapped)
    assert stats["device_bytes_peak"] <= _device_bytes_allowed(plan, rt)
    assert stats["cache_blocks_used_peak"] <= plan.cache_blocks
    if kind != "resident":
        assert stats["gathers"] > 0
        assert stats["cache_blocks_used_peak"] == plan.cache_blocks
    if kind == "host":
        chunk_bytes = sum(c.numel for c in rt.chunks) * 4
        # fp32 parameters (their own masters), AdamW's two states and the fp32 gradient buffers (kept from
        # step to step: no allocation per step) live on the host; the device holds only the cache and the
        # pooled gradient buffers once the step is over
        assert stats["host_bytes"] == 4 * chunk_bytes
        assert stats["device_bytes"] == stats["cache_bytes"] + stats["grad_buffer_bytes"]
        assert stats["cache_bytes"] <= plan.cache_blocks * max(c.numel for c in rt.chunks) * 4
        assert stats["grad_buffer_bytes"] <= 3 * max(c.numel for c in rt.chunks) * 4


def test_model_data_is_counted_exactly():
    """After a step with everything resident: parameters (their own masters) + AdamW's two states
    + one pooled gradient buffer per chunk (adopted as the masters' gradients, kept for the next step)."""
    model = build("gpt")
    wrapped, opt = _wrap(model, "resident")
    loss_of(wrapped, batches(1)[0]).backward()
    opt.step()
    rt = elixir.runtime_of(wrapped)
    numel = sum(c.numel for c in rt.chunks)
    buffers = len(rt.chunks) * max(c.numel for c in rt.chunks) * 4
    assert elixir.memory_stats(wrapped)["grad_buffer_bytes"] == buffers
    assert elixir.memory_stats(wrapped)["device_bytes"] == numel * 4 * 3 + buffers
    opt.zero_grad()
    assert elixir.memory_stats(wrapped)["device_bytes"] == numel * 4 * 3 + buffers
    loss_of(wrapped, batches(1)[0]).backward()  # the next step reuses the pool
    opt.step()
    assert elixir.memory_stats(wrapped)["grad_buffer_bytes"] == buffers


def test_state_dict_of_a_wrapped_model_has_the_full_values():
    model = build("gpt2")  # tied embedding: two keys, one parameter
    _, params, wrapped, _ = train_elixir(model, batches(2), 2, "host")
    sd = wrapped.state_dict()
    assert torch.equal(sd["lm_head.weight"], params["transformer.wte.weight"])
    for name, value in params.items():
        assert torch.equal(sd[name], value), name
    with pytest.raises(ValueError, match="load the weights before elixir.wrap"):
        wrapped.load_state_dict(sd)


def test_cache_is_no_larger_than_the_on_demand_chunks_need():
    """Four blocks of a generous chunk size for a model of two small on-demand chunks: two blocks
    of the larger chunk's size are allocated, not four of the plan's capacity."""
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plan = elixir.Plan.uniform(model, chunk_mib=1.0, cache_blocks=4, resident=False, optimizer=opt)
    assert len(plan.chunks) <= 2
    model, opt = elixir.wrap(model, opt, plan=plan)
    rt = elixir.runtime_of(model)
    stats = elixir.memory_stats(model)
    assert stats["cache_blocks"] == len(rt.chunks)
    assert stats["cache_bytes"] == len(rt.chunks) * max(c.numel for c in rt.chunks) * 4
    assert plan.cache_layout() == (len(plan.chunks), max(c.numel for c in rt.chunks))


def test_a_deleted_wrapped_model_frees_its_runtime_and_optimizer():
    import gc
    import weakref

    def wrapped():
        model = build("gpt")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        model, opt = elixir.wrap(model, opt, plan=make_plan(model, "mixed", opt, dtype=torch.bfloat16))
        for x in batches(2):
            opt.backward(loss_of(model, x))
            opt.step()
            opt.zero_grad()
        return weakref.ref(elixir.runtime_of(model)), weakref.ref(opt)

    runtime, optimizer = wrapped()
    gc.collect()
    assert runtime() is None and optimizer() is None


def test_fetch_wait_counts_the_time_uses_wait_for_their_chunks():
    """memory_stats' fetch_wait_s: nothing while every chunk stays gathered; the demand gathers of on-demand
    chunks, which grow with the gathers, otherwise."""
    model = build("gpt")
    x = batches(2)
    waits = {}
    for kind in ("resident", "on_demand"):
        m, opt = _wrap(copy.deepcopy(model), kind)
        before = elixir.memory_stats(m)["fetch_wait_s"]
        for b in x:
            opt.backward(loss_of(m, b))
            opt.step()
            opt.zero_grad()
        stats = elixir.memory_stats(m)
        waits[kind] = (stats["fetch_wait_s"] - before, stats["gathers"])
    assert waits["resident"][0] == 0.0
    assert waits["on_demand"][0] > 0 and waits["on_demand"][1] > 0
