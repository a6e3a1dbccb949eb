"""Checkpoints on one process: exact resume, atomic saves, clear errors, export and load_pretrained.

Several ranks, resharding and the export round trip under 2 ranks are in test_checkpoint_ranks.py.
"""

import json
import os
import shutil

import pytest
import torch

import elixir
from elixir.checkpoint import CheckpointError
from elixir.checkpoint.files import StreamWriter, file_digest
from helpers import VOCAB, batches, build, loss_of, make_plan

DATA = batches(8)


def setup(kind="resident", dtype=torch.float32, family="gpt"):
    model = build(family)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, kind, opt, dtype=dtype))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    return model, opt, sched


def train(model, opt, sched, data):
    losses = []
    for x in data:
        loss = loss_of(model, x)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses


def folder_digests(path):
    return {f: file_digest(os.path.join(path, f)) for f in sorted(os.listdir(path))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", [("resident", "resident"), ("host", "host"), ("mixed", "on_demand")])
def test_resume_is_bit_identical(tmp_path, dtype, kinds):
    # 4 steps, save, a fresh model and optimizer (possibly under another plan) load and run 4 more:
    # the same losses, bit for bit, and the same parameters, as 8 uninterrupted steps
    whole = setup(kinds[0], dtype)
    full = train(*whole, DATA)
    first = setup(kinds[0], dtype)
    a = train(*first, DATA[:4])
    elixir.save(first[0], first[1], tmp_path / "ck", extra={"note": "step 4"}, scheduler=first[2])
    second = setup(kinds[1], dtype)
    extra = elixir.load(second[0], second[1], tmp_path / "ck", scheduler=second[2])
    assert extra == {"note": "step 4"}
    assert second[1].steps == 4 and second[2].last_epoch == 4
    b = train(*second, DATA[4:])
    assert a + b == full
    want, got = elixir.full_state_dict(whole[0]), elixir.full_state_dict(second[0])
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_saving_twice_replaces_the_checkpoint_atomically(tmp_path):
    model, opt, sched = setup()
    train(model, opt, sched, DATA[:2])
    elixir.save(model, opt, tmp_path / "ck")
    train(model, opt, sched, DATA[2:3])
    elixir.save(model, opt, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no .tmp or .old left behind
    other, other_opt, _ = setup()
    elixir.load(other, other_opt, tmp_path / "ck")
    assert other_opt.steps == 3


def test_an_exception_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt, sched = setup("host")
    train(model, opt, sched, DATA[:2])
    elixir.save(model, opt, tmp_path / "ck", scheduler=sched)
    before = folder_digests(tmp_path / "ck")
    saved_params = elixir.full_state_dict(model)
    train(model, opt, sched, DATA[2:4])

    calls = {"n": 0}
    real_write = StreamWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        return real_write(self, name, tensor)

    monkeypatch.setattr(StreamWriter, "write", failing_write)
    with pytest.raises(OSError, match="injected"):
        elixir.save(model, opt, tmp_path / "ck", scheduler=sched)
    monkeypatch.undo()
    assert folder_digests(tmp_path / "ck") == before
    fresh, fresh_opt, fresh_sched = setup("host")
    elixir.load(fresh, fresh_opt, tmp_path / "ck", scheduler=fresh_sched)
    assert fresh_opt.steps == 2
    got = elixir.full_state_dict(fresh)
    assert all(torch.equal(saved_params[n], got[n]) for n in got)
    # and the next save goes through, clearing what the failed one left
    elixir.save(model, opt, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_crash_between_the_renames_leaves_the_old_checkpoint_loadable(tmp_path):
    model, opt, sched = setup()
    train(model, opt, sched, DATA[:1])
    elixir.save(model, opt, tmp_path / "ck")
    os.rename(tmp_path / "ck", tmp_path / "ck.old")  # the state right after the first rename
    fresh, fresh_opt, _ = setup()
    elixir.load(fresh, fresh_opt, tmp_path / "ck")
    assert fresh_opt.steps == 1


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    model, opt, _ = setup()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an Elixir checkpoint"):
        elixir.save(model, opt, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


@pytest.fixture
def saved(tmp_path):
    model, opt, sched = setup("on_demand")
    train(model, opt, sched, DATA[:2])
    elixir.save(model, opt, tmp_path / "ck")
    return tmp_path / "ck"


def _load_fails(path, match):
    model, opt, sched = setup("on_demand")
    train(model, opt, sched, DATA[:1])
    before = elixir.full_state_dict(model)
    with pytest.raises(CheckpointError, match=match) as e:
        elixir.load(model, opt, path)
    after = elixir.full_state_dict(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "a failed load changed the model"
    assert opt.steps == 1
    return str(e.value)


def test_a_truncated_shard_file_is_named(saved):
    f = saved / "rank-00000-of-00001.safetensors"
    size = os.path.getsize(f)
    with open(f, "r+b") as h:
        h.truncate(size - 100)
    msg = _load_fails(saved, "truncated")
    assert str(f) in msg and f"{size - 100} bytes" in msg


def test_an_altered_shard_file_is_named(saved):
    f = saved / "rank-00000-of-00001.safetensors"
    with open(f, "r+b") as h:
        h.seek(os.path.getsize(f) - 10)
        byte = h.read(1)
        h.seek(-1, 1)
        h.write(bytes([byte[0] ^ 0xFF]))
    msg = _load_fails(saved, "sha256")
    assert str(f) in msg


def test_a_missing_file_is_named(saved):
    os.remove(saved / "common.pt")
    msg = _load_fails(saved, "missing")
    assert "common.pt" in msg
    shutil.rmtree(saved)
    _load_fails(saved, "no such checkpoint")


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model = build("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, "resident", opt))
    elixir.save(model, opt, tmp_path / "llama")
    msg = _load_fails(tmp_path / "llama", "another model")
    assert "parameter" in msg


def test_a_manifest_with_a_changed_shape_is_refused(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    name = next(iter(manifest["model"]["shapes"]))
    manifest["model"]["shapes"][name] = [3, 3]
    (saved / "manifest.json").write_text(json.dumps(manifest))
    msg = _load_fails(saved, "another model")
    assert name in msg and "[3, 3]" in msg


# --- export and load_pretrained ------------------------------------------------------------------


def test_export_to_one_file_holds_the_trained_weights(tmp_path):
    from safetensors.torch import load_file

    model, opt, sched = setup("mixed")
    train(model, opt, sched, DATA[:3])
    elixir.export(model, str(tmp_path / "model.safetensors"))
    got = load_file(tmp_path / "model.safetensors")
    want = elixir.full_state_dict(model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    elixir.export(model, str(tmp_path / "half.safetensors"), dtype=torch.bfloat16)
    half = load_file(tmp_path / "half.safetensors")
    assert all(half[n].dtype == torch.bfloat16 and torch.equal(half[n], want[n].bfloat16()) for n in want)


def _meta_wrapped(reference, kind):
    with torch.device("meta"):
        model = type(reference)(reference.config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    return elixir.wrap(model, opt, plan=make_plan(model, kind, opt))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_load_pretrained_into_a_model_built_on_meta(tmp_path, family):
    reference = build(family).eval()
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # several shards and an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    x = batches(1)[0]
    for kind in ("resident", "host"):
        model, opt = _meta_wrapped(reference, kind)
        with pytest.raises(ValueError, match="load_pretrained"):
            model(input_ids=x)
        before = elixir.memory_stats(model)
        report = elixir.load_pretrained(model, str(tmp_path / "hf"))
        after = elixir.memory_stats(model)
        assert report == {"missing": [], "unexpected": []}
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=x).logits, reference(input_ids=x).logits)
        # the load added at most one tensor to the host at a time, never the model
        largest = max(p.numel() * 4 for p in reference.parameters())
        model_bytes = sum(p.numel() * 4 for p in reference.parameters())
        assert after["host_bytes_peak"] - before["host_bytes"] <= largest < model_bytes / 4
        assert after["host_bytes"] == before["host_bytes"]


def test_load_pretrained_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    reference = build("llama").eval()
    weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
    dropped = weights.pop("model.norm.weight")
    save_file(weights, tmp_path / "partial.safetensors")
    model, _ = _meta_wrapped(reference, "resident")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        elixir.load_pretrained(model, str(tmp_path / "partial.safetensors"))
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*shape \[3\]"):
        elixir.load_pretrained(model, str(tmp_path / "wrong.safetensors"))
    weights["model.norm.weight"] = dropped
    weights["extra.weight"] = torch.ones(2)
    save_file(weights, tmp_path / "more.safetensors")
    assert elixir.load_pretrained(model, str(tmp_path / "more.safetensors"))["unexpected"] == ["extra.weight"]
    with pytest.raises(CheckpointError, match="no such file"):
        elixir.load_pretrained(model, str(tmp_path / "nowhere"))


def test_export_folder_loads_in_transformers(tmp_path):
    import transformers

    model, opt, sched = setup("host", family="opt")
    train(model, opt, sched, DATA[:2])
    elixir.export(model, str(tmp_path / "out"), max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, model.eval()(input_ids=x).logits, rtol=0, atol=1e-6)
    assert back.config.vocab_size == VOCAB


def test_verify_false_still_checks_sizes(saved):
    f = saved / "rank-00000-of-00001.safetensors"
    with open(f, "r+b") as h:
        h.truncate(os.path.getsize(f) - 8)
    model, opt, _ = setup("on_demand")
    with pytest.raises(CheckpointError, match="truncated"):
        elixir.load(model, opt, saved, verify=False)


def test_an_extra_that_could_not_be_loaded_is_refused_before_writing(tmp_path):
    import numpy as np

    model, opt, _ = setup()
    with pytest.raises(ValueError, match="extra="):
        elixir.save(model, opt, tmp_path / "ck", extra={"array": np.zeros(3)})
    assert not os.path.exists(tmp_path / "ck") and not os.path.exists(tmp_path / "ck.tmp")
