"""The cost model against hand-computed cases, and the search's choices."""

import dataclasses

import pytest
import torch

import elixir
from elixir.hardware import Hardware
from elixir.plan import ChunkPlan, Plan
from elixir.profile import OpRecord, Profile
from elixir.search import PlanDoesNotFitError, search, simulate
from elixir.search.cost import _OP_OVERHEAD_S
from helpers import batches, build, small_chunk_mib

MS = 1e-3
NUMEL = 1000  # every parameter: 1000 fp32 elements, one chunk each


def hand_profile(forward, backward, flops=10**9, activation_bytes=0):
    ops = [OpRecord(f"op{i}", "forward", (p,), flops, activation_bytes) for i, p in enumerate(forward)]
    ops += [OpRecord(f"bop{i}", "backward", (p,), flops, activation_bytes) for i, p in enumerate(backward)]
    names = sorted(set(forward) | set(backward))
    fwd = flops * len(forward)
    return Profile(
        ops=ops, param_shapes={n: (NUMEL,) for n in names}, param_numels={n: NUMEL for n in names},
        peak_activation_bytes=activation_bytes, forward_flops=fwd, backward_flops=flops * len(backward),
        total_flops=flops * len(ops),
    )


def gpu(fetch_s=0.5 * MS, **kw):
    """A GPU whose ops take 1 ms (1 GFLOP at 1 TFLOP/s) and whose host shard fetch takes `fetch_s`."""
    return Hardware(
        name="test-gpu", device_bytes=10**9, host_bytes=10**10, matmul_flops={"float32": 1e12},
        h2d_bytes_per_s=NUMEL * 4 / fetch_s, d2h_bytes_per_s=1e12, device_copy_bytes_per_s=1e15,
        device_optim_elems_per_s=1e15, host_optim_elems_per_s=1e15, **kw,
    )


def hand_plan(names, *, blocks, depth, resident=False, param_home="host"):
    return Plan(
        chunks=tuple(ChunkPlan(params=(n,), resident=resident, param_home=param_home, optim_home="device")
                     for n in names),
        chunk_numel=NUMEL, cache_blocks=blocks, prefetch_depth=depth,
        param_shapes={n: (NUMEL,) for n in names},
    )


OVERHEAD = _OP_OVERHEAD_S["gpu"]


def test_cache_misses_follow_farthest_next_use():
    # forward 0 1 2 3, backward 3 2 1 0, two blocks: 0,1 miss; 2 evicts 0 (next use farthest); 3 evicts 1;
    # backward: 3 and 2 hit; 1 misses (evicts 3, never used again); 0 misses: 6 fetches
    names = ["p0", "p1", "p2", "p3"]
    prof = hand_profile(names, names[::-1])
    pred = simulate(prof, hand_plan(names, blocks=2, depth=0), gpu())
    assert pred.fetches == 6
    # with four blocks every chunk is fetched once
    assert simulate(prof, hand_plan(names, blocks=4, depth=0), gpu()).fetches == 4
    # resident: nothing fetched
    assert simulate(prof, hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"), gpu()).fetches == 0


def test_prefetch_hides_fetches_behind_compute():
    # two ops of 1 ms on two chunks whose fetch takes 0.5 ms.
    names = ["p0", "p1"]
    prof = hand_profile(names, [])
    # no prefetch: fetch 0 (0.5), op0 (1), fetch 1 (0.5), op1 (1) = 3 ms
    serial = simulate(prof, hand_plan(names, blocks=2, depth=0), gpu())
    assert serial.step_s == pytest.approx(3 * MS + 2 * OVERHEAD, abs=1e-7)
    assert serial.stall_s == pytest.approx(1 * MS, abs=1e-7)
    # prefetch depth 1: chunk 1 arrives at 1.0 ms while op0 runs until 1.5 ms: 2.5 ms
    overlapped = simulate(prof, hand_plan(names, blocks=2, depth=1), gpu())
    assert overlapped.step_s == pytest.approx(2.5 * MS + 2 * OVERHEAD, abs=1e-7)
    assert overlapped.stall_s == pytest.approx(0.5 * MS, abs=1e-7)
    # a fetch longer than the op is only partly hidden: fetches of 2 ms -> op0 runs 2..3 ms while p1 lands at
    # 4 ms, op1 runs 4..5 ms (op0's launch overhead vanishes in that wait)
    slow = simulate(prof, hand_plan(names, blocks=2, depth=1), gpu(fetch_s=2 * MS))
    assert slow.step_s == pytest.approx(5 * MS + OVERHEAD, abs=1e-7)


def test_memory_of_a_plan_is_predicted_from_its_chunks():
    names = ["p0", "p1", "p2", "p3"]
    prof = hand_profile(names, names[::-1], activation_bytes=12345)
    plan = hand_plan(names, blocks=2, depth=0, param_home="host")
    pred = simulate(prof, plan, gpu())
    chunk_bytes = NUMEL * 4
    # device: cache, each chunk's fp32 master + two states (optimizer on the device), and its gradient. On one
    # rank the runtime adopts the pooled fp32 buffer a chunk's gradient was gathered in as the master's gradient
    # (no copy, no separate gradient shard), so the pool ends up with one buffer per chunk, held until zero_grad.
    # (Before the pooled buffers this was a gradient shard per chunk plus 3 transient buffers.)
    assert pred.model_device_bytes == 2 * chunk_bytes + 4 * (3 * chunk_bytes) + 4 * chunk_bytes
    assert pred.model_host_bytes == 4 * chunk_bytes  # parameter shards
    assert pred.device_bytes_peak == pred.model_device_bytes + 12345
    # optimizer on the host: each gradient is copied out to an fp32 host shard as soon as it is complete and
    # its buffer goes back to the pool; chunks complete one after another, so the pool holds one buffer
    on_host = dataclasses.replace(plan, chunks=tuple(dataclasses.replace(c, optim_home="host") for c in plan.chunks))
    pred = simulate(prof, on_host, gpu())
    assert pred.model_device_bytes == 2 * chunk_bytes + 1 * chunk_bytes
    # host: shards (aliased as fp32 masters: param and optimizer homes agree) + gradient + two states
    assert pred.model_host_bytes == 4 * (4 * chunk_bytes)
    # two ranks: every buffer is reduce-scattered into a gradient shard of half a chunk that stays (optimizer
    # on the device); buffers come back when their reduction finishes, 2 left in flight: 1 + 2 buffers
    two = dataclasses.replace(plan, world_size=2)
    pred = simulate(prof, two, gpu(collective_bytes_per_s={2: 1e12}))
    half = chunk_bytes // 2
    assert pred.model_device_bytes == 2 * chunk_bytes + 4 * (3 * half) + 3 * chunk_bytes + 4 * half
    # two micro-batches per step: the second one's buffers come beside the 4 the first one's gradients hold, one
    # at a time (each added into its chunk's gradient, then given back): one buffer more on one rank; on two
    # ranks its shards come beside the held ones too, each freed once its reduction finishes and it is added
    accum = dataclasses.replace(plan, grad_accum=2)
    assert simulate(prof, accum, gpu()).model_device_bytes == 2 * chunk_bytes + 4 * (3 * chunk_bytes) + 5 * chunk_bytes
    pred = simulate(prof, dataclasses.replace(two, grad_accum=2), gpu(collective_bytes_per_s={2: 1e12}))
    assert pred.model_device_bytes == 2 * chunk_bytes + 4 * (3 * half) + 3 * chunk_bytes + (4 + 3) * half
    # the optimizer on the host: every buffer goes back in both micro-batches, as before
    assert simulate(prof, dataclasses.replace(on_host, grad_accum=2), gpu()).model_device_bytes == 3 * chunk_bytes


def test_adds_on_the_worker_wait_for_the_staging_buffers():
    # four bf16 chunks on the device, their optimizer on the host, a later micro-batch: backward's operators take
    # 1 ms each (p3 to p0, from 4 ms), each chunk's gradient is complete after its operator and crosses through one
    # of the 2 staging buffers to the worker, whose add takes 2.5 ms (12 kB at 4.8 MB/s). p3 adds from 5 to 7.5
    # ms, p2 from 7.5 to 10; p1, complete at 7, waits for p3's buffer until 7.5 and adds from 10 to 12.5; p0,
    # complete at 8.5, waits for p2's until 10 and adds from 12.5 to 15, when the micro-batch ends
    from elixir.search.cost import _micro_batch

    names = ["p0", "p1", "p2", "p3"]
    prof = hand_profile(names, names[::-1])
    plan = dataclasses.replace(
        hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"), compute_dtype="bfloat16",
        grad_accum=2, chunks=tuple(ChunkPlan(params=(n,), resident=True, param_home="device", optim_home="host")
                                   for n in names))
    hw = dataclasses.replace(gpu(op_overhead_s=1e-12), host_bytes_per_s=12_000 / 2.5e-3,
                             matmul_flops={"float32": 1e12, "bfloat16": 1e12})
    later = _micro_batch(prof, plan, hw, optimizer=False, held=True)
    assert later.optim_wait_s == pytest.approx(0.5 * MS + 1.5 * MS, abs=1e-7)
    assert later.step_s == pytest.approx(15 * MS, abs=1e-7)
    # adds faster than the operators: no wait, and the step ends with the last add
    fast = dataclasses.replace(hw, host_bytes_per_s=12_000 / 0.5e-3)
    later = _micro_batch(prof, plan, fast, optimizer=False, held=True)
    assert later.optim_wait_s == 0.0 and later.step_s == pytest.approx(8.5 * MS, abs=1e-7)


@pytest.mark.parametrize("kind", ["resident", "on_demand", "host"])
def test_the_memory_of_several_micro_batches_is_the_runtime_s(kind):
    """With 3 micro-batches per step the planner's device and host bytes are what the runtime counts (the later
    micro-batches' gradient buffers beside the ones the first left held)."""
    from helpers import make_plan

    torch.manual_seed(0)
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    plan = dataclasses.replace(make_plan(model, kind, opt), grad_accum=3)
    x = batches(1, batch=6)[0]
    prof = elixir.profile(model, {"input_ids": x[:2], "labels": x[:2]})
    pred = simulate(prof, plan, Hardware.preset("CPU"))
    wrapped, opt = elixir.wrap(model, opt, plan=plan)
    for _ in range(2):
        for part in x.chunk(3):
            opt.backward(wrapped(input_ids=part, labels=part).loss / 3)
        opt.step()
        opt.zero_grad()
    stats = elixir.memory_stats(wrapped)
    assert stats["device_bytes_peak"] == pred.model_device_bytes
    assert stats["host_bytes_peak"] == pred.model_host_bytes


def _profile_gpt():
    model = build("gpt")
    x = batches(1)[0]
    return elixir.profile(model, {"input_ids": x, "labels": x})


def test_search_keeps_everything_resident_when_it_fits():
    plan, pred = search(_profile_gpt(), Hardware.preset("A100-80GB"))
    assert all(c.resident and c.optim_home == "device" for c in plan.chunks)
    assert pred.fetches == 0


def test_search_offloads_when_the_device_is_small():
    prof = _profile_gpt()
    roomy, roomy_pred = search(prof, Hardware.preset("A100-80GB"))
    budget = int(roomy_pred.device_bytes_peak * 0.7)
    hw = Hardware.preset("A100-80GB").with_memory(device_bytes=budget)
    plan, pred = search(prof, hw)
    assert pred.device_bytes_peak <= budget
    assert any(c.optim_home == "host" or not c.resident for c in plan.chunks)
    assert pred.step_s >= roomy_pred.step_s


def test_search_says_what_would_fit_when_nothing_does():
    prof = _profile_gpt()
    hw = Hardware.preset("A100-80GB").with_memory(device_bytes=prof.peak_activation_bytes // 2)
    with pytest.raises(PlanDoesNotFitError, match="smaller batch or activation checkpointing"):
        search(prof, hw)
    hw = Hardware.preset("A100-80GB").with_memory(host_bytes=10_000, device_bytes=prof.peak_activation_bytes + 10**5)
    with pytest.raises(PlanDoesNotFitError, match=r"more host memory: at least .* more GPUs: about \d+ ranks"):
        search(prof, hw)


def test_plan_api_searches_and_the_plan_trains():
    model = build("gpt")
    x = batches(1)[0]
    plan = elixir.plan(model, {"input_ids": x, "labels": x}, hardware=Hardware.preset("A100-80GB"))
    assert plan.use_order and plan.predicted["step_s"] > 0
    again = elixir.Plan.from_json(plan.to_json())
    assert again == plan
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = elixir.wrap(model, opt, plan=dataclasses.replace(plan))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def test_frozen_parameters_cost_no_optimizer_memory_and_match_the_runtime():
    """A LoRA-like split: the planner packs frozen parameters apart and charges them their shard only, as
    the runtime holds them (no master, states or gradient)."""
    from elixir.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, bias=False)).train()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    x = torch.randint(0, 64, (2, 16))
    prof = elixir.profile(model, {"input_ids": x, "labels": x})
    hw = Hardware.preset("CPU")
    plan, pred = search(prof, hw)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for c in plan.chunks:
        assert len({n in frozen for n in c.params}) == 1, c.params  # never mixed
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    wrapped, opt = elixir.wrap(model, opt, plan=plan)
    for _ in range(2):
        opt.backward(wrapped(input_ids=x, labels=x).loss)
        opt.step()
        opt.zero_grad()
    stats = elixir.memory_stats(wrapped)
    assert stats["device_bytes_peak"] == pred.model_device_bytes
    assert stats["host_bytes_peak"] == pred.model_host_bytes
    all_trained = simulate(elixir.profile(GPT(GPTConfig.preset("tiny", vocab_size=64, bias=False)),
                                          {"input_ids": x, "labels": x}), plan, hw)
    assert pred.model_device_bytes < all_trained.model_device_bytes


def test_measured_overheads_are_charged_per_operator_and_per_fetch():
    # two ops of 1 ms on two on-demand chunks fetched serially (0.5 ms each, no prefetch): 3 ms plus overheads
    names = ["p0", "p1"]
    prof = hand_profile(names, [])
    plan = hand_plan(names, blocks=2, depth=0)
    hw = gpu(op_overhead_s=0.1 * MS, interception_op_s=0.05 * MS, fetch_overhead_s=0.2 * MS)
    # per op: 0.1 (operator) + 0.05 (interception: the plan has on-demand chunks); per fetch 0.2 on the issuing
    # thread before the copy: 2 x (0.2 + 0.5 + 1 + 0.15) = 3.7 ms
    assert simulate(prof, plan, hw).step_s == pytest.approx(3.7 * MS, abs=1e-7)
    # all resident: no interception and no fetch, only the operator overhead: 2 x (1 + 0.1)
    resident = hand_plan(names, blocks=0, depth=0, resident=True, param_home="device")
    assert simulate(prof, resident, hw).step_s == pytest.approx(2.2 * MS, abs=1e-7)
    # a record without measured overheads keeps the built-in default per operator and charges nothing else
    assert simulate(prof, plan, gpu()).step_s == pytest.approx(3 * MS + 2 * OVERHEAD, abs=1e-7)


def test_the_compute_scale_multiplies_the_operators_not_the_runtime_s_own_work():
    # the same two ops and fetches as above, the model's operators timed at 1.5x the rates' prediction (see
    # elixir/search/block.py): per op (1 + 0.1) x 1.5 + 0.05 interception, per fetch 0.2 + 0.5 as before:
    # 2 x (0.7 + 1.65 + 0.05) = 4.8 ms
    names = ["p0", "p1"]
    prof = hand_profile(names, [])
    hw = gpu(op_overhead_s=0.1 * MS, interception_op_s=0.05 * MS, fetch_overhead_s=0.2 * MS).with_compute_scale(1.5)
    assert simulate(prof, hand_plan(names, blocks=2, depth=0), hw).step_s == pytest.approx(4.8 * MS, abs=1e-7)
    resident = hand_plan(names, blocks=0, depth=0, resident=True, param_home="device")
    assert simulate(prof, resident, hw).step_s == pytest.approx(2 * 1.1 * 1.5 * MS, abs=1e-7)


def _cpu(spare_cores):
    """A CPU device whose ops take 1 ms plus 0.1 ms, whose host AdamW takes 0.5 ms per chunk and whose copies
    take next to nothing."""
    return Hardware(
        name="test-cpu", device_type="cpu", device_bytes=10**9, host_bytes=10**10, matmul_flops={"float32": 1e12},
        h2d_bytes_per_s=1e18, d2h_bytes_per_s=1e18, device_copy_bytes_per_s=1e18, device_optim_elems_per_s=1e18,
        host_optim_elems_per_s=NUMEL / (0.5 * MS), op_overhead_s=0.1 * MS, spare_cores=spare_cores,
    )


def test_the_update_inside_backward_hides_only_on_a_spare_core():
    # forward p0 p1, backward p1 p0, 1.1 ms each; both chunks resident with their optimizer on the host, so
    # each is updated inside backward as soon as its gradient is complete (after backward's first and last op)
    names = ["p0", "p1"]
    prof = hand_profile(names, names[::-1])
    plan = dataclasses.replace(hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"), chunks=tuple(
        ChunkPlan(params=(n,), resident=True, param_home="device", optim_home="host") for n in names))
    # a spare core: the worker updates p1 over 3.3-3.8 ms beside backward, p0 over 4.4-4.9 ms after it
    hidden = simulate(prof, plan, _cpu(spare_cores=1))
    assert hidden.step_s == pytest.approx(4.9 * MS, abs=1e-7)
    # none: each update delays the compute thread (3.3 + 0.5, then 4.9 + 0.5), as the step after backward does
    shared = simulate(prof, plan, _cpu(spare_cores=0))
    assert shared.step_s == pytest.approx(5.4 * MS, abs=1e-7)
    after = simulate(prof, dataclasses.replace(plan, overlap=False), _cpu(spare_cores=0))
    assert after.step_s == pytest.approx(5.4 * MS, abs=1e-7)
    assert shared.compute_s == pytest.approx(hidden.compute_s) == pytest.approx(4.4 * MS, abs=1e-7)


def test_an_update_checks_its_gradient_and_pays_for_the_step_call():
    # one resident chunk of 1000 elements, updated after backward at 1e9 elements/s: 1 us; before it, its fp32
    # gradient is checked for an inf or a NaN, a sum over its 4 kB at 4 GB/s of memory-bound operators: 1 us; and
    # the optimizer's step call itself costs 100 us (see [Note: the gradient check before an update])
    names = ["p0"]
    prof = hand_profile(names, names)
    plan = dataclasses.replace(hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"),
                               overlap=False)
    hw = dataclasses.replace(gpu(eager_bytes_per_s=4e9), device_optim_elems_per_s=1e9, host_optim_elems_per_s=1e9,
                             optim_step_overhead_s=100e-6)
    assert simulate(prof, plan, hw).optim_s == pytest.approx(1e-6 + 1e-6 + 100e-6)
    # fp16 divides by the loss scale, tests and reduces: 14 bytes per element read or written, 3.5 us
    half = dataclasses.replace(plan, compute_dtype="float16")
    fp16 = dataclasses.replace(hw, matmul_flops={**hw.matmul_flops, "float16": 1e12})
    assert simulate(prof, half, fp16).optim_s == pytest.approx(1e-6 + 3.5e-6 + 100e-6)
    # on the host of a GPU machine the check's 4 bytes per element are their share of the AdamW step's 28; then
    # the updated master goes up into the device's shard (0.5 ms over the test GPU's host link)
    on_host = dataclasses.replace(plan, chunks=(ChunkPlan(params=("p0",), resident=True, param_home="device",
                                                          optim_home="host"),))
    assert simulate(prof, on_host, hw).optim_s == pytest.approx(1e-6 * (1 + 4 / 28) + 100e-6 + 0.5 * MS)


def test_an_update_inside_backward_copies_the_gradient_into_its_rollback_log():
    # one resident chunk of 1000 elements with its optimizer on the host, updated inside backward: 1 us of AdamW
    # at 1e9 elements/s and the step call's 100 us. On a GPU machine that is all the worker does: the copy of the
    # gradient down to the host writes the log too, and the device checks it (the next test)
    names = ["p0"]
    prof = hand_profile(names, names)
    plan = dataclasses.replace(hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"), chunks=(
        ChunkPlan(params=("p0",), resident=True, param_home="device", optim_home="host"),))
    hw = dataclasses.replace(gpu(eager_bytes_per_s=4e9), host_optim_elems_per_s=1e9, optim_step_overhead_s=100e-6,
                             matmul_flops={"float32": 1e12, "bfloat16": 1e12})
    bf16 = dataclasses.replace(plan, compute_dtype="bfloat16")
    assert simulate(prof, bf16, hw).optim_in_backward_s == pytest.approx(1e-6 + 100e-6)
    assert simulate(prof, plan, hw).optim_in_backward_s == pytest.approx(1e-6 + 100e-6)
    # on a CPU device an fp32 gradient goes into its log directly: no copy; a bf16 log is a copy of 6 bytes per
    # element at the memory-bound rate (4 GB/s: 1.5 us), beside the check's 4 bytes (1 us)
    cpu = dataclasses.replace(hw, device_type="cpu", spare_cores=1.0)
    assert simulate(prof, plan, cpu).optim_in_backward_s == pytest.approx(1e-6 + 1e-6 + 100e-6)
    assert simulate(prof, bf16, cpu).optim_in_backward_s == pytest.approx(1e-6 + 1e-6 + 1.5e-6 + 100e-6)


def test_a_host_update_on_a_gpu_machine_leaves_its_log_and_check_to_the_copy_down():
    # the chunk of the test above, bf16, with the host's memory-bound rate measured at 2 GB/s. Inside backward the
    # copy of its gradient down to the host also writes the bf16 log (2 kB more across the 1 TB/s link), cast and
    # checked on the device first (4 kB read, 2 kB written, 4 kB read: 10 kB at the device's memory-bound rate),
    # so the worker runs AdamW alone: 1 us, and the step call's 100 us
    names = ["p0"]
    prof = hand_profile(names, names)
    plan = dataclasses.replace(hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"), chunks=(
        ChunkPlan(params=("p0",), resident=True, param_home="device", optim_home="host"),), compute_dtype="bfloat16")
    hw = dataclasses.replace(gpu(eager_bytes_per_s=4e9), host_optim_elems_per_s=1e9, optim_step_overhead_s=100e-6,
                             matmul_flops={"float32": 1e12, "bfloat16": 1e12, "float16": 1e12})
    assert hw.host_stream_rate() == 28e9
    measured = dataclasses.replace(hw, host_bytes_per_s=2e9)
    assert measured.host_stream_rate() == 2e9
    inside = simulate(prof, plan, measured)
    assert inside.optim_in_backward_s == pytest.approx(1e-6 + 100e-6)
    assert simulate(prof, plan, hw).optim_in_backward_s == pytest.approx(1e-6 + 100e-6)
    # after backward (no rollback log, the fp32 gradient copied down as it is): the host checks it at its rate
    after = simulate(prof, dataclasses.replace(plan, overlap=False), measured)
    assert after.optim_s == pytest.approx(1e-6 + 2e-6 + 100e-6 + 0.5 * MS)
    assert inside.comm_busy_s - after.comm_busy_s == pytest.approx(2000 / 1e12 + 10_000 / hw.eager_rate(10_000))
    # fp16's loss scale: the worker unscales, checks (14 bytes per element at the host's rate: 7 us) and updates
    fp16 = dataclasses.replace(plan, compute_dtype="float16")
    assert simulate(prof, fp16, measured).optim_in_backward_s == pytest.approx(1e-6 + 7e-6 + 100e-6)
    # the device's own updates and a CPU device keep their rates: the host's figure is not read there
    on_device = dataclasses.replace(plan, chunks=(ChunkPlan(params=("p0",), resident=True, param_home="device",
                                                            optim_home="device"),))
    assert simulate(prof, on_device, measured).step_s == simulate(prof, on_device, hw).step_s
    cpu = dataclasses.replace(hw, device_type="cpu", spare_cores=1.0)
    cpu_measured = dataclasses.replace(cpu, host_bytes_per_s=2e9)
    assert simulate(prof, plan, cpu_measured).step_s == simulate(prof, plan, cpu).step_s
    # a record keeps it, and refuses a negative one
    assert Hardware.from_json(measured.to_json()).host_bytes_per_s == 2e9
    with pytest.raises(ValueError, match="host_bytes_per_s=-1"):
        dataclasses.replace(hw, host_bytes_per_s=-1.0)


def test_later_micro_batches_add_into_the_held_gradients_where_they_are():
    # [Note: adding into the held gradients]: one bf16 chunk of 1000 elements resident on the device, its optimizer
    # on the host; backward's one operator ends at 2 ms. A later micro-batch adds its gradient into the held one:
    # 12 kB, on a GPU at the host's 2 GB/s (6 us) and on the device at its memory-bound rate
    from elixir.search.cost import ACCUMULATE_BYTES_PER_ELEMENT, _micro_batch

    assert ACCUMULATE_BYTES_PER_ELEMENT == 12
    names = ["p0"]
    prof = hand_profile(names, names)
    host = ChunkPlan(params=("p0",), resident=True, param_home="device", optim_home="host")
    plan = dataclasses.replace(hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"),
                               chunks=(host,), compute_dtype="bfloat16", grad_accum=3)
    hw = dataclasses.replace(gpu(eager_bytes_per_s=4e9, op_overhead_s=1e-9), host_bytes_per_s=2e9,
                             matmul_flops={"float32": 1e12, "bfloat16": 1e12})
    add = 12_000 / 2e9

    def extra(plan, hw):
        """What holding gradients adds to a micro-batch without the optimizer: (step, compute)."""
        held, first = (_micro_batch(prof, plan, hw, optimizer=False, held=h) for h in (True, False))
        return held.step_s - first.step_s, held.compute_s - first.compute_s

    # with updates inside backward the worker adds it after its copy down: the micro-batch ends 6 us later, the
    # compute thread is not held up
    step, compute = extra(plan, hw)
    assert step == pytest.approx(add) and compute == pytest.approx(0.0, abs=1e-12)
    # without a worker the main thread adds it after the device has synchronized, its copy down (4 kB at 1 TB/s)
    # on the compute stream: both on the compute clock
    step, compute = extra(dataclasses.replace(plan, overlap=False), hw)
    assert step == pytest.approx(add) and compute == pytest.approx(add + 4000 / hw.d2h_bytes_per_s)
    # a device optimizer's gradient is added on the device, where it is
    device = dataclasses.replace(plan, chunks=(dataclasses.replace(host, optim_home="device"),))
    step, compute = extra(device, hw)
    assert compute == pytest.approx(12_000 / hw.eager_rate(12_000)) and step == pytest.approx(compute)
    # on a CPU device every gradient is added where it is, by the compute thread: no copy down to the host
    cpu = dataclasses.replace(hw, device_type="cpu", spare_cores=1.0)
    step, compute = extra(plan, cpu)
    assert compute == pytest.approx(12_000 / cpu.eager_rate(12_000) - 4000 / cpu.d2h_bytes_per_s)
    # a step of 3 micro-batches: the first, one that adds, and the last (which adds, then updates)
    parts = [_micro_batch(prof, plan, hw, optimizer=False, held=False),
             _micro_batch(prof, plan, hw, optimizer=False, held=True),
             _micro_batch(prof, plan, hw, optimizer=True, held=True)]
    assert simulate(prof, plan, hw).step_s == pytest.approx(sum(p.step_s for p in parts))
    assert parts[2].optim_in_backward_s > 0 and parts[2].step_s > parts[1].step_s


def test_an_updated_master_crosses_to_the_device_in_fp32_after_backward_or_from_the_worker():
    # one resident bf16 chunk of 1000 elements on the device, its fp32 master and AdamW on the host. Its update
    # inside backward costs 1 us of AdamW and the step call's 100 us (the copy down writes its log and the device
    # checks it); after backward the host checks it too (4 of the AdamW step's 28 bytes per element). The updated
    # master goes up to the device as fp32, 4 kB at the test GPU's host link of 8 MB/s: 0.5 ms, and the device
    # casts it (a bf16 shard would have been 0.25 ms)
    names = ["p0"]
    prof = hand_profile(names, names)
    plan = dataclasses.replace(hand_plan(names, blocks=0, depth=0, resident=True, param_home="device"), chunks=(
        ChunkPlan(params=("p0",), resident=True, param_home="device", optim_home="host"),), compute_dtype="bfloat16")
    hw = dataclasses.replace(gpu(op_overhead_s=1e-9), host_optim_elems_per_s=1e9, optim_step_overhead_s=100e-6,
                             matmul_flops={"float32": 1e12, "bfloat16": 1e12})
    update = 1e-6 + 100e-6
    # after backward (no update inside it): the update, then the write
    after = simulate(prof, dataclasses.replace(plan, overlap=False), hw)
    assert after.optim_s == pytest.approx(1e-6 * (1 + 4 / 28) + 100e-6 + 0.5 * MS)
    # inside backward: the worker updates it once backward's last operator is done (2 ms), then writes it on a
    # stream of its own; the step ends when that write has landed, nothing is left for after backward
    inside = simulate(prof, plan, hw)
    assert inside.optim_s == pytest.approx(0.0, abs=1e-9)
    assert inside.step_s == pytest.approx(2 * MS + update + 0.5 * MS, abs=1e-8)


def test_the_search_updates_inside_backward_where_it_can_hide():
    prof = _profile_gpt()
    assert search(prof, Hardware.preset("A100-80GB"))[0].overlap
    cpu = _cpu(spare_cores=0)
    assert not search(prof, cpu)[0].overlap
    assert search(prof, dataclasses.replace(cpu, spare_cores=1.0))[0].overlap
    with pytest.raises(ValueError, match="spare_cores=-1"):
        dataclasses.replace(cpu, spare_cores=-1)


def test_memory_bound_operators_cost_the_bytes_they_move():
    # one operator without FLOPs that reads and writes 8 MB, at 4 GB/s of memory-bound operators: 2 ms; a profile
    # made before moved bytes were recorded charges twice its output bytes at the copy rate instead
    op = OpRecord("aten.add.Tensor", "forward", ("p0",), 0, 0, 0, 4_000_000, 8_000_000)
    prof = dataclasses.replace(hand_profile(["p0"], []), ops=[op], forward_flops=0, total_flops=0)
    plan = hand_plan(["p0"], blocks=0, depth=0, resident=True, param_home="device")
    hw = dataclasses.replace(gpu(op_overhead_s=1e-9, eager_bytes_per_s=4e9), device_copy_bytes_per_s=1e10)
    grad_copy = NUMEL * 4 / 1e10  # the gradient into the chunk's buffer once backward is done with it
    # and the update's check for non-finite gradients: a read of the 4 kB gradient, a memory-bound operator
    grad_check = NUMEL * 4 / 4e9
    assert simulate(prof, plan, hw).step_s == pytest.approx(2 * MS + 1e-9 + grad_copy + grad_check, rel=1e-6)
    old = dataclasses.replace(prof, ops=[dataclasses.replace(op, moved_bytes=None)])
    # without a measured rate, the moved bytes at the copy rate: 8 MB at 10 GB/s
    no_rate = dataclasses.replace(hw, eager_bytes_per_s=0.0)
    assert simulate(prof, plan, no_rate).step_s == pytest.approx(0.8 * MS + 1e-9 + grad_copy + NUMEL * 4 / 1e10,
                                                                 rel=1e-6)
    assert simulate(old, plan, hw).step_s == pytest.approx(2 * MS + 1e-9 + grad_copy + grad_check, rel=1e-6)
    # rates measured by size: 8 MB sits halfway (in the logarithm) between 2 MB at 8 GB/s and 32 MB at 4 GB/s,
    # so it moves at 6 GB/s; below and above the sizes measured, the nearest rate
    by_size = dataclasses.replace(hw, eager_rates={2_000_000: 8e9, 32_000_000: 4e9})
    assert by_size.eager_rate(8_000_000) == pytest.approx(6e9)
    assert by_size.eager_rate(1_000) == 8e9 and by_size.eager_rate(10**9) == 4e9
    assert simulate(prof, plan, by_size).step_s == pytest.approx(8e6 / 6e9 + 1e-9 + grad_copy + NUMEL * 4 / 8e9,
                                                                 rel=1e-6)


def test_grouped_products_run_at_their_own_rate():
    # an MoE layer's torch._grouped_mm of 2 GFLOPs at its measured 1 TFLOP/s: 2 ms, where a GEMM of as many
    # FLOPs takes 1 ms at the matmul rate of 2 TFLOP/s; without a measured figure, the matmul rate
    grouped = OpRecord("aten._grouped_mm.default", "forward", ("p0",), 2_000_000_000, 0, 0, 4_000_000, 8_000_000)
    gemm = dataclasses.replace(grouped, name="aten.mm.default")
    hw = dataclasses.replace(gpu(op_overhead_s=1e-9), matmul_flops={"float32": 2e12}, device_copy_bytes_per_s=1e10)
    plan = hand_plan(["p0"], blocks=0, depth=0, resident=True, param_home="device")
    grad_copy = grad_check = NUMEL * 4 / 1e10  # no memory-bound rate: the gradient's check at the copy rate
    for op, measured, seconds in ((grouped, {"float32": 1e12}, 2 * MS), (gemm, {"float32": 1e12}, 1 * MS),
                                  (grouped, {}, 1 * MS)):
        prof = dataclasses.replace(hand_profile(["p0"], []), ops=[op], forward_flops=op.flops, total_flops=op.flops)
        timed = dataclasses.replace(hw, grouped_mm_flops=measured)
        assert simulate(prof, plan, timed).step_s == pytest.approx(seconds + 1e-9 + grad_copy + grad_check,
                                                                   rel=1e-6)


def test_small_products_run_at_their_size_s_rate():
    # rates measured by the FLOPs of one product: 1 TFLOP/s at 10 MFLOP, 2 TFLOP/s at 1 GFLOP. A product of
    # 100 MFLOP sits halfway (in the logarithm) between them, at 1.5 TFLOP/s; one of 1 MFLOP below the smallest
    # size runs at its rate, one of 10 GFLOP above the largest at its; without the table, matmul_flops throughout
    hw = dataclasses.replace(gpu(op_overhead_s=1e-9), matmul_flops={"float32": 2e12}, device_copy_bytes_per_s=1e10,
                             matmul_by_size={"float32": {10**7: 1e12, 10**9: 2e12}})
    assert hw.matmul_rate("float32", 10**8) == pytest.approx(1.5e12)
    assert hw.matmul_rate(torch.float32, 10**6) == 1e12 and hw.matmul_rate("float32", 10**10) == 2e12
    assert hw.matmul_rate("float32") == 2e12  # no size: the large products' rate
    plan = hand_plan(["p0"], blocks=0, depth=0, resident=True, param_home="device")
    grad_copy = grad_check = NUMEL * 4 / 1e10  # no memory-bound rate: the gradient's check at the copy rate
    ops = [OpRecord("aten.mm.default", "forward", ("p0",), flops, 0, 0, 0, 0) for flops in (10**8, 10**6, 10**8)]
    prof = dataclasses.replace(hand_profile(["p0"], []), ops=ops, forward_flops=2 * 10**8 + 10**6,
                               total_flops=2 * 10**8 + 10**6)
    expected = 2 * 10**8 / 1.5e12 + 10**6 / 1e12
    assert simulate(prof, plan, hw).step_s == pytest.approx(expected + 3e-9 + grad_copy + grad_check, rel=1e-6)
    flat = dataclasses.replace(hw, matmul_by_size={})
    assert simulate(prof, plan, flat).step_s == pytest.approx(
        (2 * 10**8 + 10**6) / 2e12 + 3e-9 + grad_copy + grad_check, rel=1e-6)
    with pytest.raises(ValueError, match="matmul_by_size"):  # a size table for a dtype without a rate
        dataclasses.replace(hw, matmul_by_size={"bfloat16": {10**7: 1e12}})
    with pytest.raises(ValueError, match="FLOPs of one product"):
        dataclasses.replace(hw, matmul_by_size={"float32": {0: 1e12}})


@pytest.mark.parametrize("family,blocks,depth", [
    *[("llama", b, d) for b in (2, 3) for d in (0, 2)],
    *[("gpt", b, 0) for b in (2, 4)],
])
def test_predicted_fetches_match_the_runtime(family, blocks, depth):
    # The cost model replays the runtime's own eviction schedule and prefetch policy over the profiled order
    # (elixir/memory/schedule.py), so it predicts how many chunks a step gathers. Known difference, left out
    # here: where a module's parameters straddle two chunks and its operator uses them in the other order
    # (the reference GPT with prefetch), the runtime fetches a module's chunks at its forward hook while the
    # profile records operators, and the two can differ by a fetch.
    model = build(family)
    x = batches(1)[0]
    prof = elixir.profile(model, {"input_ids": x, "labels": x})
    plan = elixir.Plan.uniform(model, chunk_mib=small_chunk_mib(model), cache_blocks=blocks, resident=False,
                               prefetch_depth=depth)
    plan = dataclasses.replace(plan, use_order=tuple(prof.use_sequence()))
    predicted = simulate(prof, plan, Hardware.preset("A100-40GB")).fetches
    model, optim = elixir.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3), plan=plan)
    gathered = []
    for _ in range(2):
        before = elixir.memory_stats(model)["gathers"]
        model(input_ids=x, labels=x).loss.backward()
        optim.step()
        optim.zero_grad()
        gathered.append(elixir.memory_stats(model)["gathers"] - before)
    assert gathered == [predicted, predicted]
