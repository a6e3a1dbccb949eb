"""Files that are plausible but wrong, and paths that cannot be written: each refused with the file's
named error before any work, naming the user's path, the field and the fix.

Generated mutations of every file kind are in tests/test_fuzz_*.py; these are the cases one by one.
"""

import errno
import json
import os
import re
import sys
import warnings

import pytest
import torch

import elixir
from elixir import validation
from elixir.checkpoint import CheckpointError, export_checkpoint
from elixir.cli import main
from elixir.hardware import Hardware
from elixir.hardware import cache as hardware_cache
from elixir.hardware import measure as hardware_measure
from elixir.models.families import build_family, read_config

UNWRITABLE = "/proc/elixir-test/x"  # no process, root included, creates files in /proc


@pytest.fixture
def small_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = elixir.wrap(model, opt)
    elixir.save(model, opt, tmp_path / "ck")
    return tmp_path / "ck", model, opt


# --- checkpoints -------------------------------------------------------------------------------------


def test_a_manifest_without_fields_is_named_not_a_key_error(small_checkpoint, capsys):
    ck, model, opt = small_checkpoint
    (ck / "manifest.json").write_text('{"format": "elixir-checkpoint", "version": 1}')
    with pytest.raises(CheckpointError, match=r"manifest.json: field 'world_size' is missing; expected an integer"):
        elixir.load(model, opt, ck)
    with pytest.raises(SystemExit) as e:
        main(["export", str(ck), "--out", str(ck.parent / "w.safetensors")])
    assert e.value.code == 2
    assert "field 'world_size' is missing" in capsys.readouterr().err
    assert not (ck.parent / "w.safetensors").exists()


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["optimizer"].pop("steps"), "optimizer.steps"),
    (lambda m: m["optimizer"].__setitem__("loss_scale", "big"), "optimizer.loss_scale"),
    (lambda m: m["ranks"][0][0].__setitem__("group_rank", 5), "ranks[0][0].group_rank"),
    (lambda m: m["ranks"][0][0]["slots"][0].__setitem__(2, 10**9), "ranks[0][0].slots[0]"),
    (lambda m: m["files"].__setitem__("../outside", {"bytes": 1, "sha256": "0" * 64}), "files.../outside"),
    (lambda m: m["optimizer"]["param_groups"][0].__setitem__("lr", "fast"), "optimizer.param_groups[0].lr"),
])
def test_manifest_fields_are_checked_before_the_model_changes(small_checkpoint, edit, field):
    ck, model, opt = small_checkpoint
    manifest = json.loads((ck / "manifest.json").read_text())
    edit(manifest)
    (ck / "manifest.json").write_text(json.dumps(manifest))
    before = {n: p.clone() for n, p in elixir.full_state_dict(model).items()}
    with pytest.raises(CheckpointError, match=re.escape(f"field '{field}'")) as e:
        elixir.load(model, opt, ck)
    assert str(ck / "manifest.json") in str(e.value)
    after = elixir.full_state_dict(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_shard_file_that_disagrees_with_the_manifest_is_named(small_checkpoint):
    ck, model, opt = small_checkpoint
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["ranks"][0][0]["shard_numel"] += 4  # the file's tensor keeps its size
    manifest["ranks"][0][0]["numel"] += 4
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"rank-00000-of-00001.safetensors: tensor 'c0.values' has \d+ elements"):
        elixir.load(model, opt, ck, verify=False)


def test_a_damaged_common_file_is_named_before_the_model_changes(small_checkpoint):
    ck, model, opt = small_checkpoint
    manifest = json.loads((ck / "manifest.json").read_text())
    (ck / "common.pt").write_bytes(b"PK\x03\x04 not really a zip" + bytes(manifest["files"]["common.pt"]["bytes"]))
    size = os.path.getsize(ck / "common.pt")
    manifest["files"]["common.pt"]["bytes"] = size
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"common.pt: not a torch.save file"):
        elixir.load(model, opt, ck, verify=False)


def test_safetensors_headers_are_bounded_and_checked(tmp_path):
    from elixir.checkpoint.files import Reader

    def header_file(header: dict, data: bytes = b"", length: int | None = None):
        raw = json.dumps(header).encode()
        path = tmp_path / "w.safetensors"
        path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
        return str(path)

    with pytest.raises(CheckpointError, match="does not fit in the file"):
        Reader(header_file({}, length=2**63))  # a length that would allocate exabytes
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        Reader(header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)))
    with pytest.raises(CheckpointError, match="beyond the end of the file"):
        Reader(header_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)))
    with pytest.raises(CheckpointError, match="dtype 'F4', which Elixir cannot read"):
        Reader(header_file({"a": {"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)))
    with pytest.raises(CheckpointError, match=r"field 'a.shape\[0\]' is -1"):
        Reader(header_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Reader(header_file({}, length=0))


def test_a_sharded_index_is_checked(tmp_path):
    from safetensors.torch import save_file

    from elixir.checkpoint.weights import weight_files

    save_file({"a": torch.ones(2)}, tmp_path / "one.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    for weight_map, message in [
        ({"a": "../one.safetensors"}, "expected a plain file name"),
        ({"a": "two.safetensors"}, "which is not a file in"),
        ({}, "lists no tensors"),
        ({"a": 3}, "expected a plain file name"),
    ]:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            weight_files(str(tmp_path))
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors"}}))
    assert weight_files(str(tmp_path)) == [str(tmp_path / "one.safetensors")]


# --- output paths ------------------------------------------------------------------------------------


def test_export_to_an_unwritable_path_names_the_users_path(small_checkpoint, capsys):
    ck, model, _ = small_checkpoint
    with pytest.raises(SystemExit) as e:
        main(["export", str(ck), "--out", UNWRITABLE + ".safetensors"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {UNWRITABLE}.safetensors" in err and ".tmp" not in err
    with pytest.raises(ValueError, match="is a file, not a folder"):
        elixir.export(model, str(ck / "manifest.json" / "w.safetensors"))
    (ck.parent / "d.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a folder; give a file path"):
        export_checkpoint(str(ck), str(ck.parent / "d.safetensors"))


def test_export_without_room_is_refused_before_writing(small_checkpoint, monkeypatch):
    ck, _, _ = small_checkpoint
    monkeypatch.setattr(validation.shutil, "disk_usage", lambda path: _Usage(10))
    out = ck.parent / "w.safetensors"
    with pytest.raises(ValueError, match=rf"{out}: needs 120 bytes but the filesystem of .* has 10 bytes free"):
        export_checkpoint(str(ck), str(out))
    assert sorted(os.listdir(ck.parent)) == ["ck"]


class _Usage:
    def __init__(self, free):
        self.free = free


def test_a_write_that_fails_midway_names_the_users_path_and_leaves_nothing(small_checkpoint, monkeypatch):
    from elixir.checkpoint import files

    ck, _, _ = small_checkpoint

    def failing(self, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.StreamWriter, "_put", failing)
    out = ck.parent / "w.safetensors"
    with pytest.raises(OSError, match="Input/output error") as e:
        export_checkpoint(str(ck), str(out))
    assert e.value.filename == str(out)
    assert sorted(os.listdir(ck.parent)) == ["ck"]


def test_plan_checks_its_output_paths_and_matplotlib_before_the_search(tmp_path, monkeypatch, capsys):
    import elixir.cli.plan as plan_cli

    def never(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(plan_cli, "build_family", never)
    base = ["plan", "--model", "gpt2", "--gpu", "A100-80GB"]
    for flags, message in [
        (["--plot", "/proc/x.png"], "--plot /proc/x.png: cannot create files in /proc"),
        (["--plot", UNWRITABLE + ".png"], f"--plot {UNWRITABLE}.png: folder /proc/elixir-test does not exist"),
        (["--json", str(tmp_path / "no" / "such" / "p.json")], "folder .*no/such does not exist"),
        (["--json", str(tmp_path)], "is a folder; give a file path"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([*base, *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(SystemExit):
        main([*base, "--plot", str(tmp_path / "p.png")])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_output_checks_for_train(tmp_path):
    # elixir train's --out DIR and --json PATH use the same checks (check_output_folder, check_output_file)
    validation.check_output_folder(str(tmp_path / "runs" / "a"), flag="--out")
    with pytest.raises(ValueError, match=r"--out .*: exists and is not a folder"):
        (tmp_path / "f").write_text("x")
        validation.check_output_folder(str(tmp_path / "f"), flag="--out")
    with pytest.raises(ValueError, match=r"--out /proc/elixir-test/x: cannot create files in /proc"):
        validation.check_output_folder(UNWRITABLE, flag="--out")
    assert os.listdir(tmp_path) == ["f"]  # the checks leave nothing behind


# --- config.json ------------------------------------------------------------------------------------


def test_a_config_without_its_sizes_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(ValueError, match=r"essential size field\(s\) missing: num_hidden_layers \(layers\), "
                                         r"num_attention_heads \(heads\), vocab_size \(vocabulary\)"):
        build_family(str(tmp_path))


@pytest.mark.parametrize("config, message", [
    ({"model_type": "llama", "hidden_size": "64"}, "field 'hidden_size' is '64' .*; expected an integer >= 1"),
    ({"model_type": "llama", "num_hidden_layers": 10**9}, r"field 'num_hidden_layers' .*in \[1, 4096\]"),
    ({"model_type": "llama", "rms_norm_eps": "small"}, "field 'rms_norm_eps'"),
    ({"model_type": "llama", "hidden_size": 66}, "transformers refuses this config"),
    ({"model_type": "no-such-model"}, "model_type 'no-such-model' is not one transformers"),
])
def test_config_fields_are_checked(tmp_path, config, message):
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps({**sizes, **config}))
    with pytest.raises(ValueError, match=message):
        build_family(str(tmp_path))


def test_defaulted_config_fields_are_listed_in_one_warning(tmp_path, capsys):
    sizes = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(sizes))
    with pytest.warns(UserWarning, match=r"config.json: \d+ field\(s\) missing, taken from GPT2Config's defaults: "
                                         r"n_positions=1024, n_inner"):
        assert main(["plan", "--model", str(tmp_path), "--gpu", "RTX4090", "--seq-len", "64"]) == 0
    import transformers

    transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config that says everything: no warning
        assert read_config(str(tmp_path)).n_embd == 64


# --- calibration caches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [
    "{damaged", "[]", '{"format_version": 2}', "", "\xff\xfe",
])
def test_a_damaged_calibration_cache_is_ignored_with_a_warning(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("ELIXIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware_measure, "_machine_busy", lambda: "")
    monkeypatch.setattr(hardware_measure, "_measure", lambda quick: Hardware.preset("CPU"))
    path = hardware_cache._cache_path(quick=True)
    path.write_text(damage, errors="surrogateescape")
    with pytest.warns(UserWarning, match=f"ignoring the calibration cache {path}: .*; measuring again") as record:
        assert Hardware.measure(quick=True) == Hardware.preset("CPU")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert Hardware.from_json(path.read_text()) == Hardware.preset("CPU")  # replaced by the new figures


def test_a_damaged_disk_cache_is_ignored_and_an_unwritable_cache_is_only_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware_measure, "_machine_busy", lambda: "")
    monkeypatch.setattr(hardware_measure, "_disk_bytes_per_s", lambda folder, nbytes: (2e9, 1e9))
    monkeypatch.setenv("ELIXIR_CACHE_DIR", str(tmp_path / "cache"))
    assert hardware_measure.measure_disk(str(tmp_path)) == (2e9, 1e9)
    (cached,) = (tmp_path / "cache").glob("disk-*.json")
    cached.write_text('{"format_version": 3, "read_bytes_per_s": -1, "write_bytes_per_s": 1}')
    with pytest.warns(UserWarning, match="field 'read_bytes_per_s' is -1"):
        assert hardware_measure.measure_disk(str(tmp_path)) == (2e9, 1e9)
    monkeypatch.setenv("ELIXIR_CACHE_DIR", UNWRITABLE)
    with pytest.warns(UserWarning, match="cannot write the calibration cache"):
        assert hardware_measure.measure_disk(str(tmp_path)) == (2e9, 1e9)
