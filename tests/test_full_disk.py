"""A full, or read-only, filesystem under `save` and `export`: a CheckpointError naming the path and the
bytes needed and free, the half-written output removed, and what was there before still good.

The filesystems are real (a small tmpfs mounted by the test, root only). A write that runs out of space
*after* the free-space check passed (another writer filling the disk meanwhile, a quota that statfs does
not show) cannot be arranged without a race, so those tests make statfs answer that there is room
(`shutil.disk_usage` patched) and let the real write hit the real ENOSPC."""

from __future__ import annotations

import collections
import os

import pytest
import torch

import elixir
from elixir import comm
from elixir.checkpoint import store
from helpers import batches, build, loss_of, make_plan, mounted_tmpfs

Usage = collections.namedtuple("Usage", "total used free")


def _trained(steps=1):
    model = build("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, "mixed", opt))
    for x in batches(steps):
        opt.backward(loss_of(model, x))
        opt.step()
        opt.zero_grad()
    return model, opt


def _train_more(model, opt):
    opt.backward(loss_of(model, batches(1, seed=5)[0]))
    opt.step()
    opt.zero_grad()


def _checkpoint_bytes(model, opt, tmp_path) -> int:
    elixir.save(model, opt, tmp_path / "probe")
    return sum(f.stat().st_size for f in (tmp_path / "probe").iterdir())


def _loads_as(path, expected: dict) -> None:
    fresh = build("gpt", seed=3)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh, opt = elixir.wrap(fresh, opt, plan=make_plan(fresh, "mixed", opt))
    elixir.load(fresh, opt, path)
    got = elixir.full_state_dict(fresh)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def _room_claimed(monkeypatch):
    """statfs says there is room: the check passes and the write finds out."""
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(1 << 40, 0, 1 << 40))


def test_a_save_that_cannot_fit_is_refused_before_writing_and_the_previous_checkpoint_stays(tmp_path):
    model, opt = _trained()
    size = _checkpoint_bytes(model, opt, tmp_path)
    with mounted_tmpfs(tmp_path / "small", f"size={size * 3 // 2}") as small:  # one checkpoint fits, not two
        elixir.save(model, opt, small / "ck")
        saved = elixir.full_state_dict(model)
        _train_more(model, opt)
        with pytest.raises(elixir.CheckpointError, match=r"ck: it needs .* which has .* free .*Nothing was written"):
            elixir.save(model, opt, small / "ck")
        assert sorted(os.listdir(small)) == ["ck"]  # no half-written .tmp
        _loads_as(small / "ck", saved)


def test_running_out_of_space_while_saving_removes_the_half_written_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    size = _checkpoint_bytes(model, opt, tmp_path)
    with mounted_tmpfs(tmp_path / "small", f"size={size * 3 // 2}") as small:
        elixir.save(model, opt, small / "ck")
        saved = elixir.full_state_dict(model)
        _train_more(model, opt)
        _room_claimed(monkeypatch)
        with pytest.raises(elixir.CheckpointError, match=r"No space left on device .* it needs .* free now"):
            elixir.save(model, opt, small / "ck")
        monkeypatch.undo()
        assert sorted(os.listdir(small)) == ["ck"]
        _loads_as(small / "ck", saved)
    # and where there is room the same model saves and loads
    elixir.save(model, opt, tmp_path / "roomy")
    _loads_as(tmp_path / "roomy", elixir.full_state_dict(model))


def test_a_read_only_filesystem_is_named_before_writing(tmp_path):
    model, opt = _trained()
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(elixir.CheckpointError, match=r"cannot create files in .*ro.*nothing was written"):
            elixir.save(model, opt, ro / "ck")
        with pytest.raises(elixir.CheckpointError, match="cannot create files"):
            elixir.export(model, str(ro / "model.safetensors"))


@pytest.mark.parametrize("target", ["model.safetensors", "hf"])
def test_an_export_that_runs_out_of_space_leaves_the_previous_export(tmp_path, monkeypatch, target):
    model, opt = _trained()
    elixir.export(model, str(tmp_path / "probe.safetensors"))
    size = (tmp_path / "probe.safetensors").stat().st_size
    with mounted_tmpfs(tmp_path / "small", f"size={size * 3 // 2}") as small:
        out = small / target
        first = elixir.export(model, str(out))
        before = {f: open(f, "rb").read() for f in first}
        _train_more(model, opt)
        with pytest.raises(elixir.CheckpointError, match=r"needs .* free"):  # the check before the work
            elixir.export(model, str(out))
        _room_claimed(monkeypatch)
        with pytest.raises(elixir.CheckpointError, match=rf"cannot write .*{target}: No space left .* needs .* free"):
            elixir.export(model, str(out))
        monkeypatch.undo()
        assert sorted(os.listdir(small)) == [target]  # the half-written output is gone
        assert {f: open(f, "rb").read() for f in first} == before


def test_save_space_check_counts_every_rank_on_the_machine(monkeypatch, tmp_path):
    """Ranks of one machine writing to one filesystem need room for all their files together."""
    monkeypatch.setattr(comm, "all_gather_object", lambda obj, group, what="": [obj, obj])
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 1)
    model, opt = _trained()
    with pytest.raises(elixir.CheckpointError, match="needs"):
        elixir.save(model, opt, tmp_path / "ck")
    assert not os.listdir(tmp_path)
