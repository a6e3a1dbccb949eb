"""Weights in and out: `export` (safetensors file or Hugging Face folder) and `load_pretrained`.

[Note: streaming weights]
Neither direction ever holds the whole model. Export writes the safetensors header first (names
and shapes are known from the chunks) and then each tensor as its chunk is gathered, one chunk at a
time, so rank 0 holds one gathered chunk beside the file. `load_pretrained` reads, for each
parameter, only the range that falls in this rank's shard of its chunk, straight into the chunk's
shard (and master); its scratch is counted on the host tier of the model's memory counters, so
`elixir.memory_stats` shows the peak it added.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import torch

from elixir import comm
from elixir.checkpoint.buffers import init_meta_buffers, persistent_buffers
from elixir.checkpoint.files import CheckpointError, Reader, StreamWriter
from elixir.checkpoint.layout import global_slots, model_shapes, shard_pieces
from elixir.checkpoint.manifest import (
    COMMON,
    MANIFEST,
    PieceIndex,
    check_rank_file,
    rank_file,
    read_common,
    read_manifest,
    resolve,
    verify_file,
)
from elixir.checkpoint.store import save
from elixir.memory.chunk import shape_numel
from elixir.plan import DTYPES, dtype_name
from elixir.runtime.wrap import runtime_of, state_of
from elixir.validation import (
    Fields,
    check_output_file,
    check_output_folder,
    existing_ancestor,
    format_bytes,
    plain_file_name,
    read_json_file,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""Largest file of a Hugging Face folder export (transformers' `save_pretrained` cuts at 5 GB too)."""
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# --- writing -----------------------------------------------------------------------------------


def write_tensors(path: str, specs: list[tuple[str, tuple[int, ...]]], tensors, *, dtype: torch.dtype,
                  folder: bool, config_json: str | None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write tensors `specs` ([(name, shape)], in the order `tensors` yields (name, tensor)) as one
    safetensors file at `path`, or as a Hugging Face folder (config.json, `model.safetensors` or
    `model-0000i-of-0000n.safetensors` shards and their index). Returns the files written.

    Everything is written beside `path` first (`<path>.tmp`) and moved into place when complete: a write that
    fails (a full disk) removes what it wrote and leaves what was at `path` as it was; a full, over-quota or
    read-only filesystem is a CheckpointError naming the path and the bytes needed and free. `tensors` is
    read to its end even then, so that ranks gathering the tensors for rank 0 finish with it."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    tmp = path.rstrip("/") + ".tmp"
    it = iter(tensors)
    try:
        if folder:
            os.makedirs(tmp, exist_ok=True)
            names = _write_folder(tmp, specs, it, dtype, config_json, max_shard_bytes)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            writer = StreamWriter(tmp, [(n, dtype, s) for n, s in specs], {"format": "pt"})
            _stream(writer, it, len(specs))
    except BaseException as e:
        _remove(tmp)
        if not isinstance(e, OSError):
            raise
        for _ in it:  # the other ranks' gathers run to their end with rank 0's
            pass
        raise _write_error(e, path, _numel_all(s for _, s in specs) * dtype.itemsize) from None
    if not folder:
        os.replace(tmp, path)
        return [path]
    os.makedirs(path, exist_ok=True)
    for name in names:  # shards first, the index last: a reader never sees an index naming missing shards
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)
    return [os.path.join(path, n) for n in names]


def _write_folder(tmp: str, specs, it, dtype: torch.dtype, config_json: str | None, max_shard_bytes: int) -> list[str]:
    # shards: consecutive tensors up to max_shard_bytes each (a larger tensor gets a shard of its own)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for n, s in specs:
        nbytes = shape_numel(s) * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((n, s))
        size += nbytes
    names = [SINGLE] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
    ]
    written = []
    for fname, group in zip(names, groups):
        writer = StreamWriter(os.path.join(tmp, fname), [(n, dtype, s) for n, s in group], {"format": "pt"})
        _stream(writer, it, len(group))
        written.append(fname)
    if len(groups) > 1:
        total = sum(shape_numel(s) * dtype.itemsize for _, s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, g in zip(names, groups) for n, _ in g}}
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=2)
        written.append(INDEX)
    if config_json is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config_json)
        written.append("config.json")
    return written


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _write_error(e: OSError, path: str, nbytes: int) -> Exception:
    """The error of a write that failed: for a full, over-quota or read-only filesystem a CheckpointError
    naming what it needs and has; otherwise the OSError, naming the user's path (not the temporary one)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        folder = existing_ancestor(os.path.dirname(os.path.abspath(path)))
        try:
            free = format_bytes(shutil.disk_usage(folder).free)
        except OSError:
            free = "?"
        return CheckpointError(
            f"cannot write {path}: {e.strerror or e}; it needs {format_bytes(nbytes)}, the filesystem of {folder} has "
            f"{free} free now. What was written was removed and what was at the path before is as it was: free some "
            "space or choose a path on another filesystem"
        )
    return OSError(e.errno, f"{e.strerror or e} (writing it)", path)


def _stream(writer: StreamWriter, tensors, count: int) -> None:
    try:
        for _ in range(count):
            name, t = next(tensors)
            writer.write(name, t)
    except BaseException:
        writer.abort()
        raise
    writer.close()



def _numel_all(shapes) -> int:
    return sum(shape_numel(s) for s in shapes)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES[dtype_name(dtype)]


@torch.no_grad()
def export(model: torch.nn.Module, path: str, *, dtype=torch.float32,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write a wrapped model's weights with its own parameter names; every rank calls it, rank 0 writes.

    `path` ending in `.safetensors`: one consolidated file. Otherwise a folder as Hugging Face's
    `save_pretrained` writes it (`config.json` when the model has a config, one `model.safetensors`
    or shards of at most `max_shard_bytes` with an index), which `from_pretrained` loads. Values are
    the fp32 masters cast to `dtype`; tied parameters are written once, under their first name.
    Chunks are gathered one at a time (see [Note: streaming weights]). Returns the files written."""
    dtype = _dtype(dtype)
    rt = runtime_of(model)
    _check_output_on_rank0(path, _output_bytes(model_shapes(rt.chunks).values(), persistent_buffers(model), dtype), rt)
    if any(getattr(s.param, "_elixir_global", None) is not None for c in rt.chunks for s in c.slots):
        return _export_via_checkpoint(model, path, dtype, max_shard_bytes)
    rt.wait_pending()
    buffers = persistent_buffers(model)
    specs = [(s.name, tuple(s.shape)) for c in rt.chunks for s in c.slots]
    specs += [(n, tuple(b.shape)) for n, b in buffers.items()]
    rank = comm.rank_and_world()[0]

    opt = state_of(model).optimizer

    def tensors():
        for c in rt.chunks:
            full = torch.empty(c.numel, dtype=torch.float32, device=rt.device)
            with opt.loaded(c):  # a disk chunk's master is in memory while it is gathered
                src = c.master if c.master is not None else c.shard
                comm.all_gather(full, src.to(device=rt.device, dtype=torch.float32), c.group,
                                what=f"all-gather of chunk {c.index} for export")
            for s in c.slots:
                yield s.name, full[s.offset : s.offset + s.numel].view(s.shape)
            del full
        yield from buffers.items()

    config = getattr(model, "config", None)
    config_json = config.to_json_string() if config is not None and hasattr(config, "to_json_string") else None
    folder = not path.endswith(".safetensors")
    if rank == 0:
        written = write_tensors(path, specs, tensors(), dtype=dtype, folder=folder, config_json=config_json,
                                max_shard_bytes=max_shard_bytes)
    else:
        for _ in tensors():  # take part in every gather
            pass
        written = []
    comm.barrier(comm.world_group(), what=f"barrier of elixir.export({path!r})")
    return written


def check_output(path: str, nbytes: int) -> None:
    """ValueError naming `path` unless an export of `nbytes` can be written there (a `.safetensors` file,
    else a folder): called before the export's work starts."""
    try:
        if path.endswith(".safetensors"):
            check_output_file(path, nbytes=nbytes, make_parents=True)
        else:
            check_output_folder(path, nbytes=nbytes)
    except ValueError as e:  # a path that cannot take the export is one of the checkpoint errors
        raise CheckpointError(str(e)) from None


def _output_bytes(shapes, buffers: dict, dtype: torch.dtype) -> int:
    """Bytes of the exported tensors (headers aside): the size the output path must have room for."""
    return _numel_all(shapes) * dtype.itemsize + sum(b.numel() * b.element_size() for b in buffers.values())


def _check_output_on_rank0(path: str, nbytes: int, rt) -> None:
    """rank 0 writes the export: its check decides for every rank, so none waits in a gather for a rank
    that failed."""
    error = None
    if comm.rank_and_world()[0] == 0:
        try:
            check_output(path, nbytes)
        except ValueError as e:
            error = e
    failed = comm.any_rank(error is not None, comm.world_group(), device=rt.device,
                           what="all-reduce of the checks of elixir.export")
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{path}: rank 0 cannot write the export there (its error says why)")


def _export_via_checkpoint(model, path, dtype, max_shard_bytes):
    """Models whose tensors are split over ranks by a parallel pattern: save a checkpoint beside the
    output, and assemble each tensor from it (one tensor at a time) on rank 0."""
    tmp = os.path.abspath(path).rstrip("/") + ".export-ckpt"
    save(model, state_of(model).optimizer, tmp)
    written = []
    if comm.rank_and_world()[0] == 0:
        written = export_checkpoint(tmp, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
        shutil.rmtree(tmp)
    comm.barrier(comm.world_group(), what=f"barrier of elixir.export({path!r})")
    return written


def export_checkpoint(ckpt: str, path: str, *, dtype=torch.float32,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """`elixir export`: the weights of a checkpoint folder written by `elixir.save`, without building
    the model or starting any process group; one tensor in memory at a time. A checkpoint with a
    `config.json` (a Hugging Face model) and an output path not ending in `.safetensors` gives a
    Hugging Face folder."""
    dtype = _dtype(dtype)
    ckpt = resolve(ckpt)
    manifest = read_manifest(ckpt)
    mpath = os.path.join(ckpt, MANIFEST)
    index = PieceIndex(manifest, mpath)
    shapes = manifest["model"]["shapes"]
    for name, shape in shapes.items():  # every tensor whole: a manifest that lost a slot must not export holes
        index.check_covered(name, 0, shape_numel(shape), mpath)
    check_output(path, _numel_all(shapes.values()) * dtype.itemsize)  # before any work
    files = {p[2] for pieces in index.pieces.values() for p in pieces}
    for name in sorted(set(manifest["files"]) | files | {COMMON}):  # what it reads is listed, and unaltered
        verify_file(ckpt, name, manifest)
    order: list[str] = []
    seen = set()
    for docs in manifest["ranks"]:
        for doc in docs:
            for name, *_ in doc["slots"]:
                if name not in seen:
                    seen.add(name)
                    order.append(name)
    common = read_common(os.path.join(ckpt, COMMON))
    buffers = common.get("buffers") or {}
    specs = [(n, tuple(shapes[n])) for n in order] + [(n, tuple(b.shape)) for n, b in buffers.items()]
    readers = {f: Reader(os.path.join(ckpt, f)) for f in files}  # headers only: data is read by ranges
    for r, docs in enumerate(manifest["ranks"]):
        name = rank_file(r, manifest["world_size"], "safetensors")
        if name in readers:
            check_rank_file(readers[name], docs, mpath, states=False)

    def tensors():
        for n in order:
            yield n, index.read_range(readers, n, 0, shape_numel(shapes[n]), "values").view(shapes[n])
        yield from buffers.items()

    config_json = None
    cpath = os.path.join(ckpt, "config.json")
    if os.path.isfile(cpath):
        with open(cpath) as f:
            config_json = f.read()
    folder = not path.endswith(".safetensors")
    written = write_tensors(path, specs, tensors(), dtype=dtype, folder=folder, config_json=config_json,
                            max_shard_bytes=max_shard_bytes)
    if folder:
        written += _write_hf_files(path, common.get("extra"))
    return written


HF_FILES = "hf_files"
"""Key of a checkpoint's `extra` holding the files a Hugging Face folder carries beside its weights and
config.json (the tokenizer's, generation_config.json), by name: text, or bytes as a uint8 tensor."""


def _write_hf_files(folder: str, extra) -> list[str]:
    """The files `elixir train` keeps in `extra[HF_FILES]`, so that the exported folder loads with
    AutoTokenizer and generates as the original did."""
    files = extra.get(HF_FILES) if isinstance(extra, dict) else None
    written = []
    for name, data in (files or {}).items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            continue  # a name that would leave the folder is never written
        out = os.path.join(folder, name)
        with open(out, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data.numpy().tobytes())
        written.append(out)
    return written


# --- reading -----------------------------------------------------------------------------------


def weight_files(path: str) -> list[str]:
    """The safetensors files of a weights path: a file, or a folder with `model.safetensors` or a
    sharded index."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder of weights")
    weight_map = read_index(path)
    if weight_map is not None:
        return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    if os.path.isfile(os.path.join(path, SINGLE)):
        return [os.path.join(path, SINGLE)]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise CheckpointError(
            f"{path}: no {SINGLE}, no {INDEX} and no .safetensors file (PyTorch .bin weights are not read; "
            "convert them with transformers' save_pretrained(safe_serialization=True))"
        )
    return [os.path.join(path, f) for f in found]


def read_index(path: str) -> dict[str, str] | None:
    """The weight map {tensor: file} of folder `path`'s sharded-safetensors index, every entry checked (a
    plain file name of a file in the folder); None when the folder has no index."""
    ipath = os.path.join(path, INDEX)
    if not os.path.isfile(ipath):
        return None
    index = Fields(read_json_file(ipath, error=CheckpointError, what="the index is damaged"), ipath,
                   error=CheckpointError)
    if "metadata" in index.data and index.get("metadata", "object", nullable=True) is not None:
        index.obj("metadata").get("total_size", "number", least=0, default=None)
    weight_map = index.obj("weight_map")
    if not weight_map.data:
        raise weight_map.fail("weight_map", "lists no tensors; expected {tensor name: file name}")
    for name, fname in weight_map.data.items():
        plain_file_name(fname, ipath, weight_map.path(name), error=CheckpointError)
        if not os.path.isfile(os.path.join(path, fname)):
            raise CheckpointError(f"{ipath}: lists {fname!r} (for {name!r}), which is not a file in {path}")
    return dict(weight_map.data)


def _check_index(path: str, readers: dict[str, Reader]) -> None:
    """Each tensor of a sharded folder's index is in the file the index names (else the index is of
    other files: weights would be half-trusted)."""
    weight_map = read_index(path) if os.path.isdir(path) else None
    for name, fname in (weight_map or {}).items():
        reader = readers[os.path.join(path, fname)]
        if name not in reader.tensors:
            raise CheckpointError(
                f"{os.path.join(path, INDEX)}: says {name!r} is in {fname}, which has no such tensor; "
                "the index does not describe these files"
            )


@torch.no_grad()
def load_pretrained(model: torch.nn.Module, path: str, *, strict: bool = True) -> dict:
    """Fill a wrapped model with weights from a safetensors file or a Hugging Face folder; every rank
    calls it. The model may have been built on the meta device and wrapped there: it is never
    materialized in full; each rank reads only the ranges of its own shards, tensor by tensor (see
    [Note: streaming weights]). Persistent buffers in the files are loaded too.

    Names are the model's own (`named_parameters`, tied parameters under any of their names).
    `strict`: a parameter missing from the files is a CheckpointError (before anything is written);
    tensors of the files that the model lacks are returned, never an error.
    Returns {"missing": [...], "unexpected": [...]}."""
    state = state_of(model)
    rt = state.runtime
    buffers = {n: b for n, b in model.named_buffers()}
    error = None
    try:
        plan, missing, unexpected, where = _check_weights(model, rt, path, strict, buffers)
    except CheckpointError as e:
        error = e
    # every rank raises, or none: nobody waits in a collective
    failed = comm.any_rank(error is not None, comm.world_group(), device=rt.device,
                           what="all-reduce of the checks of elixir.load_pretrained")
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"loading {path} failed on another rank (its error says why); nothing was changed")

    tracker = rt.tracker
    by_chunk: dict[int, list] = {}
    for entry in plan:
        by_chunk.setdefault(entry[0].index, []).append(entry)
    for entries in by_chunk.values():
        c = entries[0][0]
        with state.optimizer.loaded(c, write_back=True):  # a disk chunk's master is in memory meanwhile
            for _, gs, lo, hi, r, src in entries:
                base = c.group.rank * c.shard_numel
                start = gs.flat_start + lo - gs.chunk_offset
                part = r.read(src, start, start + hi - lo)
                tracker.count("host", part.nbytes)  # the scratch (see [Note: streaming weights])
                if c.master is not None:
                    c.master[lo - base : hi - base].copy_(part)
                if c.shard is not None and c.shard is not c.master:
                    c.shard[lo - base : hi - base].copy_(part)
                tracker.count("host", -part.nbytes)
                del part
    for name, b in buffers.items():
        if name in where:
            b.copy_(where[name].read_tensor(name))
    pending_buffers = state.buffers_without_values(where)
    if pending_buffers:
        init_meta_buffers(model, pending_buffers)
    rt.shards_changed(rt.chunks, reason="loaded")
    state.weights_loaded()
    comm.barrier(comm.world_group(), what=f"barrier of elixir.load_pretrained({path!r})")
    return {"missing": missing, "unexpected": unexpected}


def _check_weights(model, rt, path: str, strict: bool, buffers: dict):
    """What load_pretrained will read, for this rank's shards; CheckpointError for missing files,
    missing parameters (when strict) and shapes that differ, before anything is written."""
    files = weight_files(path)
    where: dict[str, Reader] = {}
    readers = {f: Reader(f) for f in files}
    _check_index(path, readers)
    for r in readers.values():
        for name in r.tensors:
            where.setdefault(name, r)
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    all_names = {n for names in aliases.values() for n in names}
    consumed = _add_legacy_names(where, all_names, {n: tuple(p.shape) for n, p in _global_shapes(model, rt)})

    # check every parameter of this rank's chunks (and its shape) before writing anything
    plan: list[tuple[object, object, int, int, Reader, str]] = []
    missing = []
    for c in rt.chunks:
        by_name = {s.name: s for s in c.slots}
        for gs, lo, hi in shard_pieces(c):
            names = aliases.get(id(by_name[gs.name].param), [gs.name])
            src = next((n for n in names if n in where), None)
            if src is None:
                missing.append(gs.name)
                continue
            r = where[src]
            if tuple(r.shape(src)) != tuple(gs.global_shape):
                raise CheckpointError(
                    f"{r.path}: tensor {src!r} has shape {list(r.shape(src))}, the model's parameter has "
                    f"{list(gs.global_shape)}; these weights are for another model configuration"
                )
            plan.append((c, gs, lo, hi, r, src))
        for gs in global_slots(c):
            names = aliases.get(id(by_name[gs.name].param), [gs.name])
            if gs.name not in missing and not any(n in where for n in names):
                missing.append(gs.name)
    if missing and strict:
        raise CheckpointError(
            f"{path}: has no tensor for {len(missing)} parameter(s) of the model, e.g. {missing[:3]}; "
            "pass strict=False to keep their current values"
        )
    unexpected = sorted(n for n in where if n not in all_names and n not in buffers and n not in consumed)

    return plan, missing, unexpected, where


def _global_shapes(model, rt):
    """(name, tensor with the global shape) of every parameter: expert-parallel ones by their whole
    [E, ...] shape (see checkpoint/layout.py)."""
    out = []
    for c in rt.chunks:
        for gs in global_slots(c):
            out.append((gs.name, torch.empty(gs.global_shape, device="meta")))
    return out


# [Note: legacy expert names]
# transformers 5 keeps a MoE layer's experts as two 3-D tensors, `experts.gate_up_proj [E, 2F, H]`
# (gate rows, then up rows) and `experts.down_proj [E, H, F]`, but writes and reads checkpoints in
# the per-expert layout of the original releases, converting on the fly (its conversion_mapping):
#   Mixtral:            block_sparse_moe.experts.{e}.w1 (gate), .w3 (up), .w2 (down), block_sparse_moe.gate
#   Qwen2-MoE, OLMoE:   mlp.experts.{e}.gate_proj, .up_proj, .down_proj
# `load_pretrained` reads those the same way, one expert at a time: the stacked tensor is never built.
_LEGACY_EXPERTS = (
    (".mlp.", ".block_sparse_moe.", ("w1", "w3", "w2")),
    (".mlp.", ".mlp.", ("gate_proj", "up_proj", "down_proj")),
)


class _StackedExperts:
    """A model tensor `experts.gate_up_proj` or `experts.down_proj` read from per-expert tensors."""

    def __init__(self, name, shape, parts: list[list[tuple[Reader, str]]]) -> None:
        self.path = parts[0][0][0].path
        self.name, self._shape, self.parts = name, tuple(shape), parts  # parts[e]: pieces concatenated on dim 0

    def shape(self, name):
        return self._shape

    def read(self, name, start=0, stop=None):
        per = 1
        for d in self._shape[1:]:
            per *= d
        stop = shape_numel(self._shape) if stop is None else stop
        out = []
        for e in range(start // per, -(-stop // per)):
            block = torch.cat([r.read_tensor(n).reshape(-1) for r, n in self.parts[e]])  # one expert
            lo, hi = max(start - e * per, 0), min(stop - e * per, per)
            out.append(block[lo:hi])
        return torch.cat(out) if out else torch.empty(0)

    def read_tensor(self, name):
        return self.read(name).view(self._shape)


def _add_legacy_names(where: dict, names: set[str], shapes: dict[str, tuple]) -> set[str]:
    """Make the model's names that the files hold under a legacy layout readable through `where`
    (see [Note: legacy expert names]); returns the file names so consumed."""
    consumed: set[str] = set()
    for name in names:
        if name in where or name not in shapes:
            continue
        for ours, theirs, (gate, up, down) in _LEGACY_EXPERTS:
            if ours not in name:
                continue
            alt = name.replace(ours, theirs)
            if alt in where:  # a renamed tensor (the router)
                where[name] = _Renamed(where[alt], alt)
                consumed.add(alt)
                break
            for suffix, keys in ((".experts.gate_up_proj", (gate, up)), (".experts.down_proj", (down,))):
                if not alt.endswith(suffix):
                    continue
                base = alt[: -len(suffix)] + ".experts"
                num = shapes[name][0]
                wanted = [[f"{base}.{e}.{k}.weight" for k in keys] for e in range(num)]
                if all(w in where for row in wanted for w in row):
                    where[name] = _StackedExperts(name, shapes[name], [[(where[w], w) for w in row] for row in wanted])
                    consumed.update(w for row in wanted for w in row)
            if name in where:
                break
    return consumed


class _Renamed:
    """A tensor of a file under another name."""

    def __init__(self, reader: Reader, name: str) -> None:
        self.reader, self.name, self.path = reader, name, reader.path

    def shape(self, _):
        return self.reader.shape(self.name)

    def read(self, _, start=0, stop=None):
        return self.reader.read(self.name, start, stop)

    def read_tensor(self, _):
        return self.reader.read_tensor(self.name)
