"""Hardware descriptions: presets, sizes, JSON, the rate lookups, and a quick measurement of this machine."""

import dataclasses
import json
import math
import re
import threading
import time

import pytest
import torch

from elixir.hardware import Hardware, cache_dir, parse_bytes
from elixir.hardware import cache as hardware_cache
from elixir.hardware import machine as hardware_machine
from elixir.hardware import measure as hardware_measure

GiB = 2**30


@pytest.mark.parametrize("name", ["A100-40GB", "A100-80GB", "H100-80GB", "H200", "RTX4090", "CPU"])
def test_presets_load_and_round_trip(name):
    hw = Hardware.preset(name)
    assert hw.name == name
    assert Hardware.from_json(hw.to_json()) == hw
    assert hw.device_bytes > 0 and hw.host_bytes > 0
    assert hw.matmul_rate("float32") > 0 and hw.matmul_rate(torch.bfloat16) >= hw.matmul_rate("float32")
    for rate in (hw.h2d_bytes_per_s, hw.d2h_bytes_per_s, hw.device_optim_elems_per_s, hw.host_optim_elems_per_s,
                 hw.device_copy_bytes_per_s):
        assert rate > 0
    assert hw.collective_rate(1) == math.inf
    assert hw.device_type == ("cpu" if name == "CPU" else "cuda")


def test_preset_figures_are_plausible():
    a100, h100, h200 = Hardware.preset("A100-40GB"), Hardware.preset("H100-80GB"), Hardware.preset("H200")
    # 312 TFLOPS bf16 peak at a 60-70% achieved fraction.
    assert 0.6 * 312e12 <= a100.matmul_flops["bfloat16"] <= 0.7 * 312e12
    assert 39 * GiB < a100.device_bytes <= 40 * GiB
    assert 139 * GiB < h200.device_bytes < 141 * GiB  # "141 GB"; the lent H200 shows ~139 GiB free
    assert h200.matmul_flops == h100.matmul_flops  # same GH100 compute, more and faster memory
    assert h200.device_optim_elems_per_s > h100.device_optim_elems_per_s
    # NVLink all-gather within a node is an order of magnitude above PCIe host copies and the next node.
    assert a100.collective_rate(8) > 5 * a100.h2d_bytes_per_s
    assert a100.collective_rate(64) < a100.collective_rate(8)  # beyond what is listed: the largest size's
    assert a100.collective_rate(3) == a100.collective_bytes_per_s[4]  # the nearest larger size listed
    # Host AdamW per rank is far slower than on the device: why optimizer placement is a choice.
    assert a100.host_optim_elems_per_s < a100.device_optim_elems_per_s / 10


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="A100-40GB, A100-80GB, H100-80GB, H200, RTX4090, CPU"):
        Hardware.preset("TPUv5")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("40GiB", 40 * GiB),
        ("40GB", 40 * 10**9),
        ("1.5TiB", 3 * 2**39),
        ("2TB", 2 * 10**12),
        ("512MiB", 512 * 2**20),
        ("100MB", 10**8),
        (" 8 gib ", 8 * GiB),
        ("4096", 4096),
        ("64KiB", 65536),
        (123, 123),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["forty GB", "40 GBs", "40XB", "", "-1GB", "1e3GB", -5])
def test_parse_bytes_rejects_with_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_bytes(bad)


def test_with_memory_and_validation():
    hw = Hardware.preset("A100-80GB")
    smaller = hw.with_memory(device_bytes="40GiB", host_bytes=64 * GiB)
    assert (smaller.device_bytes, smaller.host_bytes) == (40 * GiB, 64 * GiB)
    assert dataclasses.replace(smaller, device_bytes=hw.device_bytes, host_bytes=hw.host_bytes) == hw
    assert hw.with_memory(host_bytes="1TiB").device_bytes == hw.device_bytes
    with pytest.raises(dataclasses.FrozenInstanceError):
        hw.device_bytes = 1
    with pytest.raises(ValueError, match="device_bytes"):
        dataclasses.replace(hw, device_bytes=0)
    with pytest.raises(ValueError, match="float8"):
        dataclasses.replace(hw, matmul_flops={"float8": 1e15})
    with pytest.raises(ValueError, match="h2d_bytes_per_s"):
        dataclasses.replace(hw, h2d_bytes_per_s=-1.0)
    with pytest.raises(ValueError, match="no matmul rate for float16"):
        Hardware.preset("CPU").matmul_rate(torch.float16)
    # fused attention runs at the matmul rate unless a figure for it was measured
    assert hw.attention_rate(torch.bfloat16) == hw.matmul_rate(torch.bfloat16)
    measured = dataclasses.replace(hw, attention_flops={"bfloat16": 1e14})
    assert measured.attention_rate("bfloat16") == 1e14 and Hardware.from_json(measured.to_json()) == measured
    with pytest.raises(ValueError, match="attention_flops"):
        dataclasses.replace(hw, attention_flops={"bfloat16": 0.0})
    # so do an MoE layer's grouped products
    assert hw.grouped_mm_rate(torch.bfloat16) == hw.matmul_rate(torch.bfloat16)
    grouped = dataclasses.replace(hw, grouped_mm_flops={"bfloat16": 2e14})
    assert grouped.grouped_mm_rate("bfloat16") == 2e14 and Hardware.from_json(grouped.to_json()) == grouped
    with pytest.raises(ValueError, match="grouped_mm_flops"):
        dataclasses.replace(hw, grouped_mm_flops={"float8": 1e14})
    with pytest.raises(ValueError, match="no collective bandwidth"):
        Hardware.preset("CPU").collective_rate(2)
    data = json.loads(hw.to_json())
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        Hardware.from_json(json.dumps(data))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ELIXIR_CACHE_DIR", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.delenv("ELIXIR_CACHE_DIR")
    assert cache_dir().parts[-2:] == (".cache", "elixir")


def _grouped_mm_runs_here() -> bool:
    try:
        torch._grouped_mm(torch.ones(16, 8), torch.ones(2, 8, 8), offs=torch.tensor([8, 16], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.slow
def test_measure_quick_and_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ELIXIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware_measure, "_machine_busy", lambda: "")  # the suite's own load must not decide
    hw = Hardware.measure(quick=True)
    assert hw.name.startswith("measured")
    assert hw.matmul_flops["float32"] > 0 and hw.matmul_flops.get("bfloat16", 1.0) > 0
    for rate in (hw.h2d_bytes_per_s, hw.d2h_bytes_per_s, hw.device_copy_bytes_per_s,
                 hw.device_optim_elems_per_s, hw.host_optim_elems_per_s):
        assert 0 < rate < math.inf
    assert hw.device_bytes > 0 and hw.host_bytes > 0
    assert hw.attention_flops and all(rate > 0 for rate in hw.attention_flops.values())
    if _grouped_mm_runs_here():  # older torch builds lack it, or its CPU kernel
        assert hw.grouped_mm_flops and all(rate > 0 for rate in hw.grouped_mm_flops.values())
    # the costs of running operators at all: microseconds per operator, a fetch's bookkeeping under a second
    assert 0 < hw.op_overhead_s < 1e-3 and 0 < hw.eager_bytes_per_s < math.inf
    # memory-bound operators at three sizes, each moving more bytes per operator than the last
    assert len(hw.eager_rates) == 3 and all(0 < rate < math.inf for rate in hw.eager_rates.values())
    assert hw.eager_rate(1) == hw.eager_rates[min(hw.eager_rates)]
    # matmuls by the size of one product: the quick calibration's two sizes in float32 (only the first where it
    # alone takes long: a slow machine), the best of them the rate of large products
    sizes = hw.matmul_by_size["float32"]
    assert 1 <= len(sizes) <= 2 and max(sizes.values()) == hw.matmul_flops["float32"]
    assert hw.matmul_rate("float32", 1) == sizes[min(sizes)]
    assert 0 <= hw.interception_op_s < 1e-3 and 0 <= hw.fetch_overhead_s < 1.0
    # an optimizer step call's own cost, from AdamW on one element: well under a millisecond
    assert 0 < hw.optim_step_overhead_s < 1e-2
    assert hw.collective_bytes_per_s == {}  # a single process: nothing to measure
    assert hw.spare_cores == hardware_machine._spare_cores()
    assert hw.device_type == ("cuda" if torch.cuda.is_available() else "cpu")
    if hw.device_type == "cpu":  # device and host are the same RAM, split in two
        assert hw.device_bytes == hw.host_bytes
    # the host's memory-bound rate is timed on a GPU machine only (a CPU device prices them by `eager_rates`)
    assert (hw.host_bytes_per_s > 0) == (hw.device_type == "cuda")
    assert 0 < hardware_measure._host_bytes_per_s(2**16, 0.01) < math.inf  # the GPU machine's timing, run here

    files = list(tmp_path.glob("hardware-*-quick.json"))
    assert len(files) == 1
    assert Hardware.from_json(files[0].read_text()) == hw
    # the record describes this process's device; a copy read from the file does not know it does
    assert hw.measured_here and not Hardware.from_json(files[0].read_text()).measured_here
    cached = Hardware.measure(quick=True)
    assert cached == hw and cached.measured_here  # read back from the cache, not measured again
    files[0].write_text("{damaged")
    assert Hardware.measure(quick=True).name == hw.name  # a damaged cache is measured again and replaced
    assert Hardware.from_json(files[0].read_text()).name == hw.name


@pytest.mark.parametrize("sharded", [False, True])
def test_fetch_overhead_leaves_out_what_the_cost_model_charges_a_fetch(monkeypatch, sharded):
    """The calibration's fetches cost the runtime's work, the shards' copies and, with several ranks, the
    all-gathers' fixed cost; the cost model charges the last two on their own, so the figure is the first alone."""
    from elixir.search.cost import _COLLECTIVE_OVERHEAD_S

    per_collective = _COLLECTIVE_OVERHEAD_S["cpu"] if sharded else 0.0
    copy_rate, own = 1e9, 300e-6
    cached = (lambda: None, 2, 2 * 4096, sharded)  # (step, fetches, bytes copied, sharded) per step
    small = (lambda: None, 12, 2 * 4096 + 10 * 2**20, sharded)  # ten more fetches, of 1 MiB each
    steps = iter([cached, small])
    monkeypatch.setattr(hardware_measure, "_wrapped_step", lambda *a, **kw: next(steps))
    # the small chunks' step is 10 fetches longer: 10 MiB more copied, 10 more collectives, the runtime's work
    extra = 10 * 2**20 / copy_rate + 10 * per_collective + 10 * own
    monkeypatch.setattr(hardware_measure, "_differences", lambda first, second, **kw: extra)
    figure = hardware_measure._fetch_overhead_s(torch.device("cpu"), lambda: None, 0.01, copy_rate)
    assert figure == pytest.approx(own, rel=1e-9)
    # a difference below what the copies and collectives account for (a noisy round) is no work at all, not less
    steps = iter([cached, small])
    monkeypatch.setattr(hardware_measure, "_differences", lambda first, second, **kw: extra - 20 * own)
    assert hardware_measure._fetch_overhead_s(torch.device("cpu"), lambda: None, 0.01, copy_rate) == 0.0


def test_a_process_with_other_threads_does_not_use_the_cache(monkeypatch, tmp_path):
    """The calibration cache is keyed by what changes the rates: threads per process, torch version, device,
    ranks on the machine. Another thread count finds no cache and measures its own rates."""
    monkeypatch.setenv("ELIXIR_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    one = hardware_cache._cache_path(quick=True)
    assert f"-{threads}threads" in one.name and f"-torch{torch.__version__.split('+')[0]}" in one.name
    try:
        torch.set_num_threads(threads + 1)
        other = hardware_cache._cache_path(quick=True)
    finally:
        torch.set_num_threads(threads)
    assert other != one and f"-{threads + 1}threads" in other.name
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    two_ranks = hardware_cache._cache_path(quick=True)
    assert two_ranks not in (one, other)
    # the same two ranks on this machine in a job of two such nodes: a calibration of both levels, apart
    monkeypatch.setenv("WORLD_SIZE", "4")
    two_nodes = hardware_cache._cache_path(quick=True)
    assert two_nodes != two_ranks and two_nodes.name.endswith("-2ranks-2nodes-quick.json")


def test_spare_cores_count_the_cores_no_rank_computes_on(monkeypatch):
    monkeypatch.setattr(hardware_machine, "_cores", lambda: 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert hardware_machine._spare_cores() == 2.0  # (8 - 2 x 2) / 2 per rank
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert hardware_machine._spare_cores() == 0.0
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert hardware_machine._spare_cores() == 0.0  # more threads than cores: none, not fewer than none
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_rates_measured_on_a_busy_machine_are_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ELIXIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware_measure, "_machine_busy",
                        lambda: "load average 7.0 with 1 rank(s) of this job on 2 core(s)")
    with pytest.warns(UserWarning, match="busy.*not cached"):
        hw = Hardware.measure(quick=True)
    assert hw.matmul_flops["float32"] > 0
    assert list(tmp_path.glob("hardware-*.json")) == []


def test_a_model_s_compute_scale_is_never_written_with_the_machine():
    """`compute_scale` belongs to a model on a machine (elixir/search/block.py), `measured_here` to a process:
    neither goes into the JSON a calibration cache is made of."""
    hw = Hardware.preset("CPU").with_compute_scale(1.3)
    assert hw.compute_scale == 1.3 and hw != Hardware.preset("CPU")
    doc = json.loads(hw.to_json())
    assert "compute_scale" not in doc and "measured_here" not in doc
    again = Hardware.from_json(hw.to_json())
    assert again.compute_scale == 1.0 and not again.measured_here
    with pytest.raises(ValueError, match="compute_scale"):
        Hardware.from_json(hw.to_json().replace('"format_version"', '"compute_scale": 1.3, "format_version"'))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"Hardware.compute_scale=.*positive finite"):
            hw.with_compute_scale(bad)


def test_the_host_s_rates_are_timed_beside_a_thread_launching_kernels():
    """[Note: the host's rates beside the compute thread]: while the block runs, another thread launches kernels
    on the device without pause, and it is gone when the block ends."""
    launches = [0]
    before = threading.active_count()
    with hardware_measure._beside_launching(torch.device("cpu"), launches=launches):
        deadline = time.monotonic() + 10
        while launches[0] < 400 and time.monotonic() < deadline:
            torch.ones(2**16).sum()  # the block's own work goes on beside it
        assert any(t.name == "elixir-calibration-launcher" for t in threading.enumerate())
    assert launches[0] >= 400
    assert threading.active_count() == before
    counted = launches[0]
    time.sleep(0.05)
    assert launches[0] == counted  # stopped, not left running
