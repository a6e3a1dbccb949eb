"""elixir.save and elixir.load: per-rank shard files plus a manifest, resharded on load.

[Note: checkpoint layout]
A checkpoint is a folder:
    manifest.json                           written last; lists everything below with sizes and sha256
    rank-00000-of-00002.safetensors         one per rank: for each of its chunks `c{k}.values` (the fp32
                                            master, or the parameter shard when nothing trains it) and
                                            `c{k}.state.{name}` (optimizer states)
    rank-00000-of-00002.pt                  that rank's RNG states (torch, CUDA, Python, NumPy)
    common.pt                               rank 0: `extra`, the lr scheduler's state, persistent buffers
    config.json                             Hugging Face models only: their config, for `elixir export`
The manifest describes every rank's chunks as ranges of the model's own tensors (see layout.py), so
a checkpoint loads under any plan and world size: each rank reads, with seeks, only the ranges that
fall in its own shards; no rank ever holds the whole model.

[Note: atomic save]
Every rank writes into `<path>.tmp`; when all files and the manifest are on disk, rank 0 renames the
old checkpoint to `<path>.old`, the new one to `<path>`, and removes `<path>.old`. An exception or a
crash before that leaves `<path>` untouched; a crash between the two renames leaves the previous
checkpoint complete at `<path>.old`, where `load` finds it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import socket

import torch

from elixir import comm
from elixir.checkpoint.buffers import init_meta_buffers, persistent_buffers
from elixir.checkpoint.files import CheckpointError, Reader, StreamWriter, file_digest
from elixir.checkpoint.layout import (
    describe_shape_difference,
    fingerprint,
    global_slots,
    model_shapes,
    shard_pieces,
    values_of,
)
from elixir.checkpoint.manifest import (
    COMMON,
    FORMAT,
    MANIFEST,
    VERSION,
    PieceIndex,
    check_param_groups,
    check_rank_file,
    rank_file,
    read_common,
    read_manifest,
    read_rng,
    resolve,
    verify_file,
)
from elixir.runtime.wrap import state_of
from elixir.validation import existing_ancestor, format_bytes, probe_writable


def _wrap_state(model, optimizer):
    state = state_of(model)
    if optimizer is not None and optimizer is not state.optimizer:
        raise ValueError(
            "optimizer is not the one elixir.wrap returned for this model; pass the ElixirOptimizer from wrap()"
        )
    return state


# --- save ------------------------------------------------------------------------------------


def save(model, optimizer, path: str, *, extra=None, scheduler=None) -> None:
    """Write a checkpoint of a wrapped model and its optimizer to the folder `path`; every rank calls it.

    Saves the fp32 masters (parameter values of untrained chunks), optimizer states, step counters,
    loss scale, RNG states, `scheduler.state_dict()` and `extra` (tensors, numbers, strings, lists
    and dicts of them). The previous checkpoint at `path` is replaced only once the new one is
    complete (see [Note: atomic save])."""
    state = _wrap_state(model, optimizer)
    rt, opt = state.runtime, state.optimizer
    rank, world = comm.rank_and_world()
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, MANIFEST)):
        raise ValueError(
            f"{path} exists and is not an Elixir checkpoint (no {MANIFEST}); refusing to replace it: "
            "choose a new path or remove it"
        )
    common_bytes = _check_loadable(extra, scheduler)
    tmp = path + ".tmp"
    rt.wait_pending()  # nothing may write into a shard while it is saved

    specs, sources, chunk_docs = [], [], []
    for c in rt.chunks:
        if not c.group.counts_once:
            continue  # a replica of a shard another rank writes (see [Note: hierarchical sharding])
        key = f"c{c.index}"
        vals = values_of(c)
        specs.append((f"{key}.values", vals.dtype, tuple(vals.shape)))
        sources.append(vals)
        states = {}
        for k, v in (opt.state.get(c.master, {}) if c.master is not None else {}).items():
            if not torch.is_tensor(v):
                raise ValueError(f"optimizer state {k!r} of chunk {c.index} is not a tensor; it cannot be saved")
            states[k] = "sharded" if v.shape == c.master.shape else "replicated"
            specs.append((f"{key}.state.{k}", v.dtype, tuple(v.shape)))
            sources.append(v)
        chunk_docs.append({
            "key": key, "numel": c.numel, "shard_numel": c.shard_numel, "group_rank": c.group.rank,
            "group_size": c.group.size, "trainable": c.master is not None, "optim_group": c.optim_group,
            "states": states,
            "slots": [[g.name, g.chunk_offset, g.numel, g.flat_start] for g in global_slots(c)],
        })
    buffers = persistent_buffers(model) if rank == 0 else {}
    needed = (sum(_nbytes(dtype, shape) + _HEADER_PER_TENSOR for _, dtype, shape in specs) + _RANK_OVERHEAD
              + (common_bytes + sum(b.numel() * b.element_size() for b in buffers.values()) if rank == 0 else 0))
    total = _check_space(path, needed, rt)  # before anything is written: the old checkpoint stays beside the new
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # left by an interrupted save: never a checkpoint
        os.makedirs(tmp)
    comm.barrier(comm.world_group(), what=f"barrier of elixir.save({path!r}) before writing")

    # [Note: a failed save] every rank's own files, then rank 0's: each phase ends with the ranks agreeing
    # whether any failed, so that all of them raise (none waits in a collective for a rank that gave up),
    # the half-written folder goes, and the previous checkpoint at `path` is untouched
    files: dict[str, dict] = {}
    name = rank_file(rank, world, "safetensors")
    error = None
    try:
        writer = StreamWriter(os.path.join(tmp, name), specs, {"format": "pt", "elixir": FORMAT})
        try:
            i = 0
            for c in rt.chunks:  # a disk chunk's master and states are in memory while they are written
                key = f"c{c.index}."
                with opt.loaded(c):
                    while i < len(specs) and specs[i][0].startswith(key):
                        writer.write(specs[i][0], sources[i])
                        i += 1
            assert i == len(specs)
        except BaseException:
            writer.abort()
            raise
        size, digest = writer.close()
        files[name] = {"bytes": size, "sha256": digest}
        rng_name = rank_file(rank, world, "pt")
        torch.save(_rng_state(), os.path.join(tmp, rng_name))
        files[rng_name] = dict(zip(("bytes", "sha256"), file_digest(os.path.join(tmp, rng_name))))
    except OSError as e:
        error = e
    _agree_written(error, path, tmp, total, rt, "its own files")

    gathered = comm.all_gather_object(
        {"files": files, "chunks": chunk_docs, "shapes": model_shapes(rt.chunks)}, comm.world_group(),
        what=f"all-gather of the file list in elixir.save({path!r})",
    )
    if rank == 0:
        try:
            common = {
                "extra": extra, "scheduler": None if scheduler is None else scheduler.state_dict(),
                "buffers": {n: b.detach().cpu() for n, b in buffers.items()},
            }
            torch.save(common, os.path.join(tmp, COMMON))
            all_files = {k: v for g in gathered for k, v in g["files"].items()}
            all_files[COMMON] = dict(zip(("bytes", "sha256"), file_digest(os.path.join(tmp, COMMON))))
            config = getattr(model, "config", None)
            if config is not None and hasattr(config, "to_json_string"):
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    f.write(config.to_json_string())
                all_files["config.json"] = dict(zip(("bytes", "sha256"),
                                                    file_digest(os.path.join(tmp, "config.json"))))
            shapes = {k: list(v) for g in gathered for k, v in g["shapes"].items()}
            manifest = {
                "format": FORMAT, "version": VERSION, "world_size": world,
                "model": {"class": type(model).__name__, "fingerprint": fingerprint(shapes), "shapes": shapes},
                "plan": json.loads(state.plan.to_json()),
                "optimizer": opt.scalar_state_dict(),
                "ranks": [g["chunks"] for g in gathered],
                "files": all_files,
            }
            _write_json(os.path.join(tmp, MANIFEST), manifest)
        except OSError as e:
            error = e
    _agree_written(error, path, tmp, total, rt, "the manifest and common files")
    if rank == 0:
        _swap_in(tmp, path)
    comm.barrier(comm.world_group(), what=f"barrier of elixir.save({path!r}) after the rename")


_RANK_OVERHEAD = 64 << 10
_HEADER_PER_TENSOR = 256
"""Bytes a rank's files take beyond its tensors' (its RNG states: about 10 KiB; a safetensors header entry:
under 100 bytes), counted generously: the check is to refuse a save that cannot fit, not to cut it close."""

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


def _free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _check_space(path: str, needed: int, rt) -> int:
    """CheckpointError on every rank, before any file is written, when a rank's filesystem has less room
    than the ranks of its machine that write into it need together (checked per machine and filesystem:
    ranks on other machines may write to their own disks). Returns the bytes the whole checkpoint needs."""
    folder = existing_ancestor(os.path.dirname(path))
    error = None
    try:
        probe_writable(folder, path)  # a read-only or unwritable folder: said now, by every rank that has it
    except ValueError as e:
        error = CheckpointError(f"cannot save the checkpoint {e}; nothing was written")
    try:
        where = (socket.gethostname(), os.stat(folder).st_dev)
    except OSError:
        where = (socket.gethostname(), None)
    ranks = comm.all_gather_object((where, needed), comm.world_group(),
                                   what=f"all-gather of the sizes in elixir.save({path!r})")
    mine = sum(n for w, n in ranks if w == where)
    total = sum(n for _, n in ranks)
    free = _free_bytes(folder)
    if error is None and free is not None and free < mine:
        error = CheckpointError(
            f"cannot save the checkpoint {path}: it needs {format_bytes(mine)} on the filesystem of {folder}, which "
            f"has {format_bytes(free)} free (the previous checkpoint there stays until the new one is complete); free "
            "some space or save to another filesystem. Nothing was written"
        )
    if comm.any_rank(error is not None, comm.world_group(), device=rt.device,
                     what=f"all-reduce of the space checks of elixir.save({path!r})"):
        raise error or CheckpointError(
            f"cannot save the checkpoint {path}: another rank's filesystem has too little free space (its error says "
            "how much); nothing was written"
        )
    return total


def _agree_written(error: OSError | None, path: str, tmp: str, total: int, rt, what: str) -> None:
    """Every rank learns whether any failed to write `what`; then the half-written folder is removed and all
    of them raise: a CheckpointError naming the path, the bytes needed and free for a full, over-quota or
    read-only filesystem, the error itself on the rank that had another."""
    world = comm.world_group()
    failed = comm.any_rank(error is not None, world, device=rt.device,
                           what=f"all-reduce of the write checks of elixir.save({path!r})")
    if not failed:
        return
    if world.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier(world, what=f"barrier of elixir.save({path!r}) after removing the failed save")
    if error is None:
        raise CheckpointError(
            f"cannot save the checkpoint {path}: another rank failed to write {what} (its error says why); the "
            "half-written checkpoint was removed and the previous one, if any, is untouched"
        )
    if error.errno in _FULL:
        free = _free_bytes(existing_ancestor(os.path.dirname(path)))
        raise CheckpointError(
            f"cannot save the checkpoint {path}: {error.strerror or error} while writing {what} "
            f"({error.filename or tmp}); it needs {format_bytes(total)}, the filesystem has "
            f"{'?' if free is None else format_bytes(free)} free now. The half-written checkpoint was removed and the "
            "previous one, if any, is untouched: free some space or save to another filesystem"
        ) from error
    raise error


def _check_loadable(extra, scheduler) -> int:
    """ValueError now, before anything is written, for an `extra` (or scheduler state) that `load`
    could not read back: it loads with torch.load(weights_only=True), which takes tensors, numbers,
    strings, and lists, tuples and dicts of them, and nothing that runs code when unpickled. Returns
    the bytes they take."""
    buf = io.BytesIO()
    torch.save({"extra": extra, "scheduler": None if scheduler is None else scheduler.state_dict()}, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"extra= (or the scheduler's state) holds something a checkpoint cannot load safely ({first}); "
            "keep to tensors, numbers, strings, and lists, tuples and dicts of them"
        ) from None
    return buf.getbuffer().nbytes


def _swap_in(tmp: str, path: str) -> None:
    old = path + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if os.path.exists(old):
        shutil.rmtree(old)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _python_rng()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np  # an optional dependency

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return state


def _python_rng():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np  # an optional dependency

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# --- load ------------------------------------------------------------------------------------


def _needed_files(rt, index: PieceIndex) -> set[str]:
    files = set()
    for c in rt.chunks:
        for gs, lo, hi in shard_pieces(c):
            g_lo = gs.flat_start + lo - gs.chunk_offset
            for p in index.overlapping(gs.name, g_lo, g_lo + hi - lo):
                files.add(p[2])
    return files


def load(model, optimizer, path: str, *, scheduler=None, verify: bool = True):
    """Restore a checkpoint written by `elixir.save` into a wrapped model and its optimizer; every
    rank calls it. The checkpoint may come from another world size or plan: parameters are matched
    by name and each rank reads only its own shards' ranges. Returns the `extra` that was saved.

    Everything is checked before anything is written into the model: the manifest, that the
    checkpoint is of this model (names and shapes), and the size and sha256 of every file this rank
    reads (`verify=False` checks sizes only: hashing reads every byte once more); any rank's failure
    fails every rank (`CheckpointError` naming the file and the problem).

    RNG states are restored per rank when the world size is the same; on another world size, ranks
    that existed before get theirs back and the others keep their own."""
    state = _wrap_state(model, optimizer)
    rt, opt = state.runtime, state.optimizer
    rank, world = comm.rank_and_world()
    # every rank's tensors, gathered before anything can fail on one rank only
    shapes = comm.all_gather_object(model_shapes(rt.chunks), comm.world_group(),
                                    what="all-gather of checkpoint metadata")
    shapes_here = {k: list(v) for g in shapes for k, v in g.items()}
    error = None
    try:
        path = resolve(path)
        manifest = read_manifest(path)
        mpath = os.path.join(path, MANIFEST)
        diff = describe_shape_difference(manifest["model"]["shapes"], shapes_here)
        if diff is not None:
            raise CheckpointError(f"{path} is a checkpoint of another model: {diff}")
        index = PieceIndex(manifest, mpath)
        for c in rt.chunks:
            for gs, lo, hi in shard_pieces(c):
                g_lo = gs.flat_start + lo - gs.chunk_offset
                index.check_covered(gs.name, g_lo, g_lo + hi - lo, mpath)
        needed = sorted(_needed_files(rt, index))
        world_saved = manifest["world_size"]
        rng_name = rank_file(rank, world_saved, "pt") if rank < world_saved else None
        for name in needed + [COMMON] + ([rng_name] if rng_name else []):
            verify_file(path, name, manifest, checksum=verify)
        readers = {name: Reader(os.path.join(path, name)) for name in needed}
        ranks_of = {rank_file(r, world_saved, "safetensors"): r for r in range(world_saved)}
        for name, reader in readers.items():
            check_rank_file(reader, manifest["ranks"][ranks_of[name]], mpath)
        check_param_groups(manifest["optimizer"]["param_groups"], opt.param_groups, mpath)
        # read (and checked) now, applied after the shards: a damaged one fails before anything changes
        common = read_common(os.path.join(path, COMMON))
        rng_state = read_rng(os.path.join(path, rng_name)) if rng_name else None
    except CheckpointError as e:
        error = e
    failed = comm.any_rank(error is not None, comm.world_group(), device=rt.device,
                           what="all-reduce of the checks of elixir.load")
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"loading {path} failed on another rank (its error says why); nothing was changed")

    for c in rt.chunks:
        with opt.loaded(c, write_back=True):
            _fill_chunk(c, opt, index, readers)
    rt.wait_pending()
    rt.shards_changed(rt.chunks, reason="loaded")
    # every rank restored its shards: one that died on the way fails the others here, inside load
    comm.barrier(comm.world_group(), what=f"barrier of elixir.load({path!r}) after every rank restored its shards")
    opt.zero_grad()
    opt.load_scalar_state_dict(manifest["optimizer"])
    if rng_state is not None:
        _set_rng_state(rng_state)
    for n, b in persistent_buffers(model).items():
        if n in common.get("buffers", {}):
            b.data.copy_(common["buffers"][n])
    if state.needs_weights:  # built on the meta device: the checkpoint gave it its weights
        pending = state.buffers_without_values(common.get("buffers", {}))
        if pending:
            init_meta_buffers(model, pending)
        state.weights_loaded()
    if scheduler is not None and common["scheduler"] is not None:
        scheduler.load_state_dict(common["scheduler"])
    return common["extra"]


@torch.no_grad()
def _fill_chunk(c, opt, index: PieceIndex, readers: dict) -> None:
    pieces = shard_pieces(c)
    base = c.group.rank * c.shard_numel
    values = torch.zeros(c.shard_numel, dtype=torch.float32)
    states: dict[str, torch.Tensor] = {}
    replicated: dict[str, torch.Tensor] = {}
    for gs, lo, hi in pieces:
        g_lo = gs.flat_start + lo - gs.chunk_offset
        values[lo - base : hi - base].copy_(index.read_range(readers, gs.name, g_lo, g_lo + hi - lo, "values"))
        if c.master is None:
            continue
        first = next(index.overlapping(gs.name, g_lo, g_lo + hi - lo))
        doc = index.chunks[(first[2], first[3])]
        for k, kind in doc["states"].items():
            if kind == "replicated":
                if k not in replicated:
                    replicated[k] = readers[first[2]].read_tensor(f"{first[3]}.state.{k}")
                continue
            part = index.read_range(readers, gs.name, g_lo, g_lo + hi - lo, f"state.{k}")
            if k not in states:
                states[k] = torch.zeros(c.shard_numel, dtype=part.dtype)
            states[k][lo - base : hi - base].copy_(part)
    if c.master is not None:
        c.master.copy_(values)
        if c.shard is not None and c.shard is not c.master:
            c.shard.copy_(values)
        opt.load_chunk_state(c, {**replicated, **states})
    else:
        c.shard.copy_(values)
