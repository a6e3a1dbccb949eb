"""The disk tier (elixir/memory/disk.py): masters and optimizer states of chunks with optim_home="disk"
live in a scratch file and train bit for bit like the same chunks on the host."""

import copy
import dataclasses
import gc
import os

import pytest
import torch

import elixir
from elixir.memory.disk import ALIGN, DISK_BUFFERS, DiskError, scratch_name
from elixir.models import GPT, GPTConfig
from helpers import VOCAB, batches, loss_of, make_plan, mounted_tmpfs


def bias_free_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False)).train()


def _to_disk(plan, every: int = 1):
    """The plan with the optimizer of every `every`-th host-optimizer chunk on disk instead."""
    chunks = []
    for i, c in enumerate(plan.chunks):
        moved = c.optim_home == "host" and i % every == 0
        chunks.append(dataclasses.replace(c, optim_home="disk") if moved else c)
    return dataclasses.replace(plan, chunks=tuple(chunks))


def _train(model, plan, *, disk=None, steps=4, clip=None, opt_fn=None):
    model = copy.deepcopy(model)
    opt = opt_fn(model) if opt_fn else torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model, opt = elixir.wrap(model, opt, plan=plan, disk=disk)
    losses = []
    for x in batches(steps):
        loss = loss_of(model, x)
        opt.backward(loss)
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, elixir.full_state_dict(model), model, opt


def _same(a, b):
    assert a[0] == b[0]
    for n in b[1]:
        assert torch.equal(a[1][n], b[1][n]), n


PLANS = [("host", torch.bfloat16, 1), ("mixed", torch.float32, 1), ("mixed", torch.bfloat16, 1),
         ("host", torch.float32, 2)]


@pytest.mark.parametrize("kind,dtype,every", PLANS)
@pytest.mark.parametrize("overlap", [True, False])
def test_disk_trains_bit_for_bit_like_host(tmp_path, kind, dtype, every, overlap):
    model = bias_free_gpt()
    base = make_plan(model, kind, torch.optim.AdamW(model.parameters()), dtype=dtype)
    # a host chunk whose master is its fp32 shard has no master apart from it: move its shard to the device
    base = dataclasses.replace(base, overlap=overlap, chunks=tuple(
        dataclasses.replace(c, param_home="device") if c.optim_home == "host" and not c.resident else c
        for c in base.chunks))
    on_disk = _to_disk(base, every)
    assert any(c.optim_home == "disk" for c in on_disk.chunks)
    host = _train(model, base)
    disk = _train(model, on_disk, disk=str(tmp_path))
    _same(disk, host)
    stats = elixir.memory_stats(disk[2])
    assert stats["disk_bytes"] > 0 and stats["disk_writes"] > 0 and stats["disk_reads"] > 0


@pytest.mark.parametrize("overlap", [True, False])
def test_clip_rollbacks_and_sgd_on_disk(tmp_path, overlap):
    model = bias_free_gpt()
    for i, opt_fn in enumerate((None, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))):
        plan = make_plan(model, "mixed", torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16)
        plan = dataclasses.replace(plan, overlap=overlap)
        host = _train(model, plan, clip=0.05, opt_fn=opt_fn)
        (tmp_path / str(i)).mkdir()
        disk = _train(model, _to_disk(plan), disk=str(tmp_path / str(i)), clip=0.05, opt_fn=opt_fn)
        _same(disk, host)
        if overlap:  # the first step speculated and rolled back on disk; the clip then acted every step
            stats = elixir.step_stats(disk[2])
            assert stats["rollback_reasons"] == {"clip": 1} and stats["clip_pauses"] == 3


def test_host_holds_only_the_pools_of_disk_chunks(tmp_path):
    """Every trainable chunk's optimizer on disk, shards on the device: the host holds the disk tier's buffer
    pool and the gradient staging buffers, nothing per parameter."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, bias=False)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    plan = elixir.Plan.uniform(model, chunk_mib=0.02, resident=False, cache_blocks=4, param_home="device",
                               optim_home="disk", compute_dtype=torch.bfloat16, optimizer=opt)
    m, opt = elixir.wrap(model, opt, plan=plan, disk=str(tmp_path))
    rt = elixir.runtime_of(m)
    for x in batches(3):
        opt.backward(loss_of(m, x))
        opt.step()
        opt.zero_grad()
    stats = elixir.memory_stats(m)
    disk = rt.disk
    pool = DISK_BUFFERS * (disk.region_max + ALIGN)
    staging = rt.grads.staging_buffers * max(c.shard_numel for c in rt.chunks) * 4
    assert stats["host_bytes_peak"] == pool + staging
    shard = sum(c.shard_numel for c in rt.chunks)
    assert stats["disk_bytes"] == disk.file_bytes >= shard * (12 + 2)  # master, two states, the log
    assert os.path.getsize(disk.path) == disk.file_bytes


@pytest.mark.slow
def test_a_larger_model_keeps_its_states_out_of_host_memory(tmp_path):
    """RSS grows by the pools, not by the 12-14 bytes per parameter the disk holds (O_DIRECT: no page cache)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=512, vocab_size=256, block_size=64)).train()
    n = model.num_params()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    plan = elixir.Plan.uniform(model, chunk_mib=2.0, resident=False, cache_blocks=4, param_home="device",
                               optim_home="disk", compute_dtype=torch.bfloat16, optimizer=opt)
    m, opt = elixir.wrap(model, opt, plan=plan, disk=str(tmp_path))
    x = torch.randint(0, 256, (2, 32))
    opt.backward(m(input_ids=x, labels=x).loss)
    opt.step()
    opt.zero_grad()
    gc.collect()
    before = _rss()
    for _ in range(3):
        opt.backward(m(input_ids=x, labels=x).loss)
        opt.step()
        opt.zero_grad()
    grown = _rss() - before
    on_disk = elixir.memory_stats(m)["disk_bytes"]
    assert on_disk >= 12 * n
    assert grown < on_disk / 4, (grown, on_disk)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_scratch_file_lives_with_the_model(tmp_path, capsys):
    model = bias_free_gpt()
    plan = _to_disk(make_plan(model, "host", torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16))
    m = copy.deepcopy(model)
    m, opt = elixir.wrap(m, torch.optim.AdamW(m.parameters()), plan=plan, disk=str(tmp_path))
    path = tmp_path / scratch_name(0, 1)
    assert path.exists()
    with pytest.raises(DiskError, match="in use by a run that is still going"):
        other = copy.deepcopy(model)
        elixir.wrap(other, torch.optim.AdamW(other.parameters()), plan=plan, disk=str(tmp_path))
    del m, opt
    gc.collect()
    assert not path.exists()
    path.write_bytes(b"left by a run that died")  # no lock held: stale
    m = copy.deepcopy(model)
    m, opt = elixir.wrap(m, torch.optim.AdamW(m.parameters()), plan=plan, disk=str(tmp_path))
    assert "left by a run that did not finish" in capsys.readouterr().err
    opt.backward(loss_of(m, batches(1)[0]))
    opt.step()


def test_a_checkpoint_of_disk_chunks_resumes_bit_for_bit_and_reshards_to_host(tmp_path):
    model = bias_free_gpt()
    plan = make_plan(model, "host", torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16)
    on_disk = _to_disk(plan)
    data = batches(6)

    def run(m, opt, xs):
        for x in xs:
            opt.backward(loss_of(m, x))
            opt.clip_grad_norm_(0.05)
            opt.step()
            opt.zero_grad()

    m = copy.deepcopy(model)
    m, opt = elixir.wrap(m, torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), plan=on_disk,
                         disk=str(tmp_path / "a"))
    run(m, opt, data[:3])
    elixir.save(m, opt, tmp_path / "ckpt")
    assert not any(p.name.startswith("elixir-scratch") for p in (tmp_path / "ckpt").iterdir())
    run(m, opt, data[3:])
    want = elixir.full_state_dict(m)
    for target, folder in ((on_disk, tmp_path / "b"), (plan, None)):
        fresh = copy.deepcopy(model)
        fresh, fresh_opt = elixir.wrap(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2, fused=True),
                                       plan=target, disk=None if folder is None else str(folder))
        elixir.load(fresh, fresh_opt, tmp_path / "ckpt")
        run(fresh, fresh_opt, data[3:])
        got = elixir.full_state_dict(fresh)
        assert all(torch.equal(got[n], want[n]) for n in want), target.chunks[0].optim_home


def test_export_and_full_state_dict_read_disk_chunks(tmp_path):
    model = bias_free_gpt()
    plan = _to_disk(make_plan(model, "host", torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16))
    _, params, m, _ = _train(model, plan, disk=str(tmp_path / "s"), steps=2)
    elixir.export(m, str(tmp_path / "w.safetensors"))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "w.safetensors"))
    for n, p in params.items():
        assert torch.equal(exported[n], p), n


def test_bad_scratch_folders_are_clear_errors_before_anything_is_allocated(tmp_path):
    model = bias_free_gpt()
    plan = _to_disk(make_plan(model, "host", torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16))

    def wrap(disk):
        m = copy.deepcopy(model)
        return elixir.wrap(m, torch.optim.AdamW(m.parameters()), plan=plan, disk=disk)

    with pytest.raises(ValueError, match="need a scratch folder"):
        wrap(None)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        wrap(str(tmp_path / "a-file"))
    with pytest.raises(ValueError, match="cannot be made"):
        wrap(str(tmp_path / "a-file" / "below"))
    with pytest.raises(ValueError, match="keeps the states of Adam, AdamW and SGD"):
        m = copy.deepcopy(model)
        elixir.wrap(m, torch.optim.Adagrad(m.parameters()), plan=plan, disk=str(tmp_path))
    with pytest.raises(ValueError, match="param_home='disk'"):
        dataclasses.replace(plan.chunks[0], param_home="disk", resident=False)
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        with pytest.raises(ValueError, match=r"bytes free .* need"):
            wrap(str(small))
        assert os.listdir(small) == []
    with mounted_tmpfs(tmp_path / "ro", "ro") as ro:
        with pytest.raises(ValueError, match="not writable"):
            wrap(str(ro))


def _ranks_disk(rank, world, folder):
    torch.manual_seed(0)
    model = bias_free_gpt()
    results = []
    for to_disk in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, fused=True)
        plan = make_plan(m, "mixed", opt, dtype=torch.bfloat16)
        plan = _to_disk(plan) if to_disk else plan
        m, opt = elixir.wrap(m, opt, plan=plan, disk=folder if to_disk else None)
        for x in batches(3, batch=8):
            opt.backward(loss_of(m, x.chunk(world)[rank]))
            opt.clip_grad_norm_(1e-3)
            opt.step()
            opt.zero_grad()
        results.append(elixir.full_state_dict(m))
        if to_disk:
            assert os.path.exists(os.path.join(folder, scratch_name(rank, world)))
            elixir.save(m, opt, os.path.join(folder, "ckpt"))
            if rank == 0:
                torch.save(results[-1], os.path.join(folder, "want.pt"))
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


@pytest.mark.dist
def test_two_ranks_on_disk_match_host_and_reshard_to_one(tmp_path):
    from dist import run_ranks

    run_ranks(_ranks_disk, 2, str(tmp_path))
    # the 2-rank checkpoint of disk chunks, loaded by one process with its own disk folder
    m = bias_free_gpt()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, fused=True)
    plan = _to_disk(make_plan(m, "mixed", opt, dtype=torch.bfloat16))
    m, opt = elixir.wrap(m, opt, plan=dataclasses.replace(plan, world_size=1), disk=str(tmp_path / "one"))
    elixir.load(m, opt, tmp_path / "ckpt")
    got, want = elixir.full_state_dict(m), torch.load(tmp_path / "want.pt")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert opt.steps == 3


def test_a_failing_disk_is_a_named_error(tmp_path, monkeypatch):
    """Fault injection: the scratch file is preallocated whole, so a full filesystem cannot stop a step; what
    can is a failing device, simulated here by the reads failing with EIO."""
    import errno

    model = bias_free_gpt()
    plan = _to_disk(make_plan(model, "host", torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16))
    m = copy.deepcopy(model)
    m, opt = elixir.wrap(m, torch.optim.AdamW(m.parameters()), plan=plan, disk=str(tmp_path))
    opt.backward(loss_of(m, batches(1)[0]))
    opt.step()
    opt.zero_grad()

    def failing(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(DiskError, match=r"reading from .*elixir-scratch.*Input/output error"):
        opt.backward(loss_of(m, batches(1)[0]))
        opt.step()


@pytest.mark.parametrize("overlap", [True, False])
def test_the_planner_predicts_disk_host_and_device_bytes_exactly(tmp_path, overlap):
    from elixir.hardware import Hardware
    from elixir.search.cost import simulate

    model = bias_free_gpt()
    plan = make_plan(model, "mixed", torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16)
    plan = dataclasses.replace(_to_disk(plan), overlap=overlap)
    _, _, m, _ = _train(model, plan, disk=str(tmp_path), steps=2)
    stats = elixir.memory_stats(m)
    x = batches(1)[0]
    prof = elixir.profile(bias_free_gpt(), {"input_ids": x, "labels": x}, compute_dtype=torch.bfloat16)
    hw = Hardware.preset("CPU").with_disk(disk_bytes="1TiB", read_bytes_per_s=2e9, write_bytes_per_s=1e9)
    pred = simulate(prof, plan, hw)
    assert pred.model_disk_bytes == stats["disk_bytes"]
    assert pred.model_host_bytes == stats["host_bytes_peak"]
    assert pred.model_device_bytes == stats["device_bytes_peak"]
    assert pred.disk_busy_s > 0


@pytest.mark.slow
def test_elixir_plan_puts_optimizer_states_on_disk_when_the_host_is_short(capsys):
    from elixir.cli import main

    flags = ["plan", "--model", "opt-30b", "--gpu", "A100-40GB", "--host-memory", "128GiB"]
    assert main([*flags, "--disk-memory", "0"]) == 1
    text = capsys.readouterr().out
    assert "no plan fits" in text and "a scratch disk for the optimizer states" in text
    assert main([*flags, "--disk-memory", "4TB", "--disk-bandwidth", "6GB/s"]) == 0
    text = capsys.readouterr().out
    assert "disk" in text.split("chunk ")[0] and "scratch disk" in text and "busy" in text


def test_elixir_train_with_the_optimizer_on_disk(tmp_path):
    from elixir.cli import main

    folder = tmp_path / "scratch"
    flags = ["train", "--model", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every",
             "0", "--eval-batches", "1", "--on-demand", "--param-home", "host", "--quiet"]
    with pytest.raises(SystemExit):
        main([*flags, "--optim-home", "disk"])  # no --disk
    assert main([*flags, "--optim-home", "disk", "--disk", str(folder)]) == 0
    assert os.listdir(folder) == []  # the scratch file went with the run
