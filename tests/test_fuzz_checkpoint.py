"""Fuzzed checkpoint files: manifests, safetensors headers, common.pt and RNG files, sharded-safetensors indexes.

Each test mutates one valid file of a small checkpoint (fields removed, types changed, numbers out of
range, truncation at every byte boundary of the header, random bytes) and holds its reader to
tests/fuzzing.py's contract: read, or a CheckpointError, within bounded time and memory, every file
unchanged. Mutations that leave a file valid by the format (an optional field removed) may load.
"""

import json
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elixir
from elixir.checkpoint import CheckpointError, export_checkpoint
from elixir.checkpoint.files import Reader
from elixir.checkpoint.manifest import read_common, read_rng
from elixir.checkpoint.weights import _check_index, weight_files, write_tensors
from fuzzing import (
    byte_flips,
    check_reader,
    digests,
    dotted,
    examples,
    flipped,
    mutations,
    sha256,
    truncation_points,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of two Linear layers in two chunks, one AdamW step in: every kind of manifest entry,
    in a folder of its own; `out` is where exports go."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plan = elixir.Plan.uniform(model, chunk_mib=24 * 4 / 2**20, cache_blocks=1, resident=False, param_home="host",
                               optim_home="host", optimizer=opt)
    model, opt = elixir.wrap(model, opt, plan=plan)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    root = tmp_path_factory.mktemp("fuzz-checkpoint")
    elixir.save(model, opt, root / "files" / "ck")
    (root / "out").mkdir()
    return root / "files" / "ck", root / "out", model, opt


def _load_and_export(kind, ck, out, model, opt, *, must_fail=False, export_must_fail=None):
    """Both readers of a checkpoint, on whatever `ck` holds now: elixir.load and elixir export."""
    check_reader(kind, ck.parent, lambda: elixir.load(model, opt, ck), CheckpointError, must_fail=must_fail)
    target = out / "w.safetensors"
    failed = check_reader(kind, ck.parent, lambda: export_checkpoint(str(ck), str(target)), CheckpointError,
                          must_fail=must_fail if export_must_fail is None else export_must_fail)
    assert sorted(os.listdir(out)) == ([] if failed else ["w.safetensors"])  # nothing half-written
    for f in os.listdir(out):
        os.remove(out / f)


def _truncated_at_every_byte(kind: str, folder, path, read, *, dense: int = 64, step: int = 1) -> None:
    """`read` must refuse the file at `path` cut at every byte boundary (see fuzzing.truncation_points;
    every `step`-th of those)."""
    good = path.read_bytes()
    base = digests(folder)
    rel = os.path.relpath(path, folder)
    try:
        for n in list(truncation_points(len(good), dense=dense))[::step]:
            path.write_bytes(good[:n])
            check_reader(kind, folder, read, CheckpointError, must_fail=True, before={**base, rel: sha256(good[:n])})
    finally:
        path.write_bytes(good)


class _Consistent:
    """A file of the checkpoint replaced for one example with its manifest entry (size and sha256) to match,
    so that the readers of its contents, not the checksum, meet the damage; both restored after it."""

    def __init__(self, ck, name: str, data: bytes) -> None:
        self.ck, self.name, self.data = ck, name, data

    def __enter__(self):
        import hashlib

        self.saved = {n: (self.ck / n).read_bytes() for n in (self.name, "manifest.json")}
        manifest = json.loads(self.saved["manifest.json"])
        manifest["files"][self.name] = {"bytes": len(self.data), "sha256": hashlib.sha256(self.data).hexdigest()}
        (self.ck / "manifest.json").write_text(json.dumps(manifest))
        (self.ck / self.name).write_bytes(self.data)

    def __exit__(self, *exc):
        for n, data in self.saved.items():
            (self.ck / n).write_bytes(data)


class _Replaced:
    """A file of the checkpoint replaced for one example, and restored after it."""

    def __init__(self, path, data: bytes) -> None:
        self.path, self.data = path, data

    def __enter__(self):
        self.saved = self.path.read_bytes()
        self.path.write_bytes(self.data)

    def __exit__(self, *exc):
        self.path.write_bytes(self.saved)


# --- manifest.json ----------------------------------------------------------------------------------


def _manifest_may_load(how: str, path: tuple, value, reader: str) -> bool:
    """Mutations that leave a manifest valid by its format (so loading it is right, not a miss)."""
    text = dotted(path)
    return (
        how == "huge"  # a step count of 2**63 is a number like any other
        or text == "plan" or text.startswith("plan.")  # kept for information only
        or text.startswith("optimizer.param_groups[")  # checked against the optimizer's own kinds
        or text.startswith("optimizer.speculation.")  # what the update inside backward learned
        or text == "optimizer.speculation" and (how == "remove" or value is None)
        or text.endswith(".optim_group") and value is None
        or ".states." in text and how == "remove"  # a chunk whose parameters had no gradient has no states
        or reader == "export" and text == "files.rank-00000-of-00001.pt" and how == "remove"  # not read
    )


@pytest.mark.slow
@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_fuzzed_manifests(checkpoint, data):
    ck, out, model, opt = checkpoint
    manifest = json.loads((ck / "manifest.json").read_text())
    doc, how, path = data.draw(mutations(manifest))
    value = _value_at(doc, path)
    with _Replaced(ck / "manifest.json", json.dumps(doc).encode()):
        check_reader("checkpoint manifest", ck.parent, lambda: elixir.load(model, opt, ck), CheckpointError,
                     must_fail=not _manifest_may_load(how, path, value, "load"))
        target = out / "w.safetensors"
        failed = check_reader("checkpoint manifest", ck.parent, lambda: export_checkpoint(str(ck), str(target)),
                              CheckpointError, must_fail=not _manifest_may_load(how, path, value, "export"))
        assert sorted(os.listdir(out)) == ([] if failed else ["w.safetensors"])
        for f in os.listdir(out):
            os.remove(out / f)


def _value_at(doc, path):
    try:
        for key in path:
            doc = doc[key]
        return doc
    except (KeyError, IndexError, TypeError):
        return None  # removed


@pytest.mark.slow
def test_manifests_truncated_at_every_byte(checkpoint):
    ck, out, model, opt = checkpoint
    manifest = ck / "manifest.json"
    _truncated_at_every_byte("checkpoint manifest", ck.parent, manifest, lambda: elixir.load(model, opt, ck))
    # export reads the manifest through the same read_manifest: a sample of the cuts
    _truncated_at_every_byte("checkpoint manifest", ck.parent, manifest,
                             lambda: export_checkpoint(str(ck), str(out / "w.safetensors")), step=7)
    assert os.listdir(out) == []


@settings(max_examples=examples(0.5))
@given(data=st.data())
def test_manifests_of_random_bytes(checkpoint, data):
    ck, out, model, opt = checkpoint
    text = (ck / "manifest.json").read_bytes()
    replaced = data.draw(st.one_of(st.binary(max_size=2 * len(text)), byte_flips(len(text)).map(
        lambda flips: flipped(text, flips))))
    with _Replaced(ck / "manifest.json", replaced):
        _load_and_export("checkpoint manifest", ck, out, model, opt)


# --- safetensors headers ----------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + rest


def _read_every_tensor(path):
    reader = Reader(str(path))
    for name in reader.tensors:
        reader.read_tensor(name)


@pytest.mark.slow
@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_fuzzed_safetensors_headers(checkpoint, data):
    ck, out, model, opt = checkpoint
    shard = ck / "rank-00000-of-00001.safetensors"
    header, rest = _split(shard.read_bytes())
    doc, how, path = data.draw(mutations(header))
    value = _value_at(doc, path)
    may_load = (how == "huge" or path[0] == "__metadata__" and (len(path) > 1 or how == "remove" or value is None)
                or how == "remove" and len(path) == 1)  # a file with fewer tensors is a valid file
    with _Consistent(ck, shard.name, _join(doc, rest)):
        check_reader("safetensors header", ck.parent, lambda: _read_every_tensor(shard), CheckpointError,
                     must_fail=not may_load)
        _load_and_export("safetensors header", ck, out, model, opt, must_fail=not may_load)


@pytest.mark.slow
def test_safetensors_truncated_at_every_byte(checkpoint):
    ck, out, model, opt = checkpoint
    shard = ck / "rank-00000-of-00001.safetensors"
    header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    # every byte boundary of the length field and the header, and of the data after it
    _truncated_at_every_byte("safetensors header", ck.parent, shard, lambda: _read_every_tensor(shard), dense=header)


@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_safetensors_of_random_bytes(checkpoint, data):
    ck, out, model, opt = checkpoint
    shard = ck / "rank-00000-of-00001.safetensors"
    good = shard.read_bytes()
    n = int.from_bytes(good[:8], "little")
    replaced = data.draw(st.one_of(
        st.binary(max_size=2 * len(good)),
        byte_flips(8 + n).map(lambda flips: flipped(good, flips)),  # the length field and the header
        st.integers(0, 2**64 - 1).map(lambda length: length.to_bytes(8, "little") + good[8:]),
    ))
    with _Replaced(shard, replaced):
        check_reader("safetensors header", ck.parent, lambda: _read_every_tensor(shard), CheckpointError)


# --- common.pt and the RNG files ------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_fuzzed_common_and_rng_files(checkpoint, data):
    ck, out, model, opt = checkpoint
    name, read = data.draw(st.sampled_from([("common.pt", read_common), ("rank-00000-of-00001.pt", read_rng)]))
    path = ck / name
    good = path.read_bytes()
    replaced = data.draw(st.one_of(
        st.binary(max_size=2 * len(good)),
        byte_flips(len(good)).map(lambda flips: flipped(good, flips)),
        st.integers(0, len(good) - 1).map(lambda n: good[:n]),
        _changed_contents(path),
    ))
    with _Consistent(ck, name, replaced):  # flips in what no CRC covers (timestamps, comments) may still load
        check_reader("common.pt and RNG files", ck.parent, lambda: read(str(path)), CheckpointError)
        check_reader("common.pt and RNG files", ck.parent, lambda: elixir.load(model, opt, ck), CheckpointError)


def _changed_contents(path):
    """What torch.save writes for a common.pt or RNG state with one entry removed or of another type."""
    import io

    state = torch.load(path, weights_only=True)

    def saved(how_key_value):
        how, key, value = how_key_value
        changed = dict(state)
        if how == "remove":
            changed.pop(key, None)
        else:
            changed[key] = value
        buf = io.BytesIO()
        torch.save(changed if how != "top" else value, buf)
        return buf.getvalue()

    values = st.sampled_from([None, 3, "x", [1, 2], {"a": torch.zeros(2)}, torch.zeros(3), (1.5,)])
    return st.tuples(st.sampled_from(["remove", "set", "top"]), st.sampled_from(sorted(state)), values).map(saved)


def test_common_file_truncated_at_every_byte(checkpoint):
    ck, _, _, _ = checkpoint
    _truncated_at_every_byte("common.pt and RNG files", ck.parent, ck / "common.pt",
                             lambda: read_common(str(ck / "common.pt")))


def test_common_file_must_hold_what_load_reads(tmp_path):
    import io
    import zipfile

    def written(obj) -> str:
        path = tmp_path / "common.pt"
        buf = io.BytesIO()
        torch.save(obj, buf)
        path.write_bytes(buf.getvalue())
        return str(path)

    for obj in [[1, 2], {"scheduler": None}, {"extra": None}, {"extra": 1, "scheduler": 5},
                {"extra": 1, "scheduler": None, "buffers": {"b": 3}}]:
        path = written(obj)
        check_reader("common.pt and RNG files", tmp_path, lambda path=path: read_common(path), CheckpointError,
                     must_fail=True)
    # the same entries deflated: an entry could then inflate far beyond the file
    good = zipfile.ZipFile(written({"extra": None, "scheduler": None}))
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as z:
        for info in good.infolist():
            z.writestr(info.filename, good.read(info.filename))
    with pytest.raises(CheckpointError, match="compressed"):
        read_common(str(tmp_path / "deflated.pt"))


# --- sharded-safetensors index ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A folder of three shards and their index, as `elixir export` writes it."""
    folder = tmp_path_factory.mktemp("fuzz-index") / "hf"
    specs = [(f"layer.{i}.weight", (4, 4)) for i in range(3)]
    tensors = ((n, torch.full(s, float(i))) for i, (n, s) in enumerate(specs))
    write_tensors(str(folder), specs, tensors, dtype=torch.float32, folder=True, config_json=None,
                  max_shard_bytes=64)
    assert (folder / "model.safetensors.index.json").exists()
    return folder


def _read_folder(folder):
    files = weight_files(str(folder))
    _check_index(str(folder), {f: Reader(f) for f in files})


@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_fuzzed_indexes(sharded, data):
    index = sharded / "model.safetensors.index.json"
    doc, how, path = data.draw(mutations(json.loads(index.read_text())))
    value = _value_at(doc, path)
    may_load = (how == "huge" or path[0] == "metadata" and (how == "remove" or len(path) == 1 and value is None)
                or path[0] == "weight_map" and len(path) == 2 and how == "remove" and len(doc["weight_map"]) > 0)
    with _Replaced(index, json.dumps(doc).encode()):
        check_reader("sharded-safetensors index", sharded, lambda: _read_folder(sharded), CheckpointError,
                     must_fail=not may_load)


def test_indexes_truncated_at_every_byte(sharded):
    _truncated_at_every_byte("sharded-safetensors index", sharded, sharded / "model.safetensors.index.json",
                             lambda: _read_folder(sharded))


@settings(max_examples=examples(0.5))
@given(data=st.data())
def test_indexes_of_random_bytes(sharded, data):
    index = sharded / "model.safetensors.index.json"
    good = index.read_bytes()
    replaced = data.draw(st.one_of(st.binary(max_size=2 * len(good)),
                                   byte_flips(len(good)).map(lambda flips: flipped(good, flips))))
    with _Replaced(index, replaced):
        check_reader("sharded-safetensors index", sharded, lambda: _read_folder(sharded), CheckpointError)


def test_the_fixtures_are_valid(checkpoint, sharded):
    # every mutation above starts from files the readers accept
    ck, out, model, opt = checkpoint
    _load_and_export("checkpoint manifest", ck, out, model, opt)
    _read_folder(sharded)
    shutil.rmtree(out)
    out.mkdir()
