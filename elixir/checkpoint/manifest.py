"""Reading a checkpoint folder's own files, each checked before use: the manifest, `common.pt`, the RNG files,
and ranges of the model's tensors from the rank files (`PieceIndex`).

Everything here reads and nothing writes (see [Note: untrusted files] in elixir/validation.py). A
manifest is checked field by field when it is read (`read_manifest`): presence, type and range of
every field `load` and `export` use, so that a hand-edited or damaged manifest is a `CheckpointError`
naming the file and the field, never a KeyError deep in a load. What can only be checked against
other files (a shard file's tensors against the chunks the manifest describes) is checked by
`check_rank_file` once that file's header is read, still before anything is written into a model.
"""

from __future__ import annotations

import os
import random
import re
import zipfile

import torch

from elixir.checkpoint.files import CheckpointError, Reader, file_digest
from elixir.memory.chunk import shape_numel
from elixir.validation import Fields, plain_file_name, read_json_file, shown

FORMAT = "elixir-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
COMMON = "common.pt"
STATE_KINDS = ("sharded", "replicated")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def rank_file(rank: int, world: int, ext: str) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.{ext}"


def resolve(path: str) -> str:
    """The checkpoint folder to read: `path`, or `<path>.old` when a save was interrupted between
    its two renames (see [Note: atomic save] in store.py)."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    if not os.path.exists(path) and os.path.isfile(os.path.join(path + ".old", MANIFEST)):
        return path + ".old"
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    raise CheckpointError(f"{os.path.join(path, MANIFEST)}: missing; {path} is not a complete Elixir checkpoint")


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint folder `path`, every field checked (see `check_manifest`)."""
    mpath = os.path.join(path, MANIFEST)
    data = read_json_file(mpath, error=CheckpointError, what="the manifest is damaged")
    return check_manifest(data, mpath)


def check_manifest(data, mpath: str) -> dict:
    """`data` (a parsed manifest) when every field has its type and range; CheckpointError naming `mpath`
    and the first field that does not. Slots are checked against the chunks that hold them here, and
    against the model's shapes by PieceIndex, after `load` has compared those shapes with the model's
    (so that another model's checkpoint is reported as such)."""
    top = Fields(data, mpath, error=CheckpointError)
    if top.data.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not an Elixir checkpoint manifest (its 'format' is not {FORMAT!r})")
    if top.data.get("version") != VERSION or isinstance(top.data.get("version"), bool):
        raise CheckpointError(f"{mpath}: format version {top.data.get('version')!r}, this Elixir reads {VERSION}")
    world = top.get("world_size", "int", least=1)

    model = top.obj("model")
    model.get("class", "str")
    model.get("fingerprint", "str")
    shapes = model.obj("shapes")
    for name, shape in shapes.data.items():
        at = shapes.path(name)
        shapes.check(shape, at, "list")
        for i, d in enumerate(shape):
            shapes.check(d, f"{at}[{i}]", "int", least=0)
    if "plan" in top.data:
        top.obj("plan")  # kept for the reader's information; load plans afresh

    opt = top.obj("optimizer")
    opt.get("class", "str")
    opt.get("steps", "int", least=0)
    opt.get("skipped_steps", "int", least=0)
    opt.get("loss_scale", "number", above=0)
    opt.get("good_steps", "int", least=0)
    opt.objects("param_groups")  # values are checked against the optimizer they load into
    if opt.get("speculation", "object", default=None, nullable=True):  # {} or absent: nothing learned yet
        spec = opt.obj("speculation")
        # the clip's coefficient is whatever the last clip computed (NaN after a NaN norm); a norm type
        # may be inf (the max norm, which JSON writes as Infinity), or null in a run that does not clip
        spec.get("clip_coef", "number", finite=False)
        spec.get("norm_type", "number", above=0, nullable=True, finite=False)
        spec.get("backwards", "int", least=1)

    files = top.obj("files")
    for name in files.data:
        plain_file_name(name, mpath, files.path(name), error=CheckpointError)
        info = files.obj(name)
        info.get("bytes", "int", least=0)
        digest = info.get("sha256", "str")
        if not _SHA256.match(digest):
            raise info.fail(info.path("sha256"), f"is {shown(digest)}; expected 64 lowercase hexadecimal digits")

    ranks = top.get("ranks", "list")
    if len(ranks) != world:
        raise top.fail("ranks", f"lists {len(ranks)} rank(s); expected one list of chunks per rank "
                       f"(world_size={world})")
    for r, docs in enumerate(ranks):
        top.check(docs, f"ranks[{r}]", "list")
        keys: set[str] = set()
        for i, raw in enumerate(docs):
            _check_chunk(Fields(raw, mpath, error=CheckpointError, at=f"ranks[{r}][{i}]"), shapes.data, keys)
    return data


def _check_chunk(doc: Fields, shapes: dict, keys: set[str]) -> None:
    key = doc.get("key", "str")
    if not key or key in keys:
        raise doc.fail(doc.path("key"), f"is {shown(key)}; expected a chunk key that no other chunk of the rank has")
    keys.add(key)
    doc.get("numel", "int", least=0)
    group_size = doc.get("group_size", "int", least=1)
    doc.get("group_rank", "int", least=0, most=group_size - 1)
    shard_numel = doc.get("shard_numel", "int", least=0)
    doc.get("trainable", "bool")
    doc.get("optim_group", "int", least=0, nullable=True)
    states = doc.obj("states")
    for k in states.data:
        states.get(k, "str", choices=STATE_KINDS)
    slots = doc.get("slots", "list")
    capacity = group_size * shard_numel
    for j, slot in enumerate(slots):
        at = f"{doc.path('slots')}[{j}]"
        if not isinstance(slot, list) or len(slot) != 4:
            raise doc.fail(at, f"is {shown(slot)}; expected [name, chunk offset, numel, flat start]")
        name, off, numel, flat = slot
        doc.check(name, f"{at}[0]", "str")
        if name not in shapes:
            raise doc.fail(f"{at}[0]", f"names {name!r}, which is not among the manifest's model.shapes")
        doc.check(off, f"{at}[1]", "int", least=0)
        doc.check(numel, f"{at}[2]", "int", least=0)
        doc.check(flat, f"{at}[3]", "int", least=0)
        if off + numel > capacity:
            raise doc.fail(at, f"holds elements [{off}, {off + numel}) of a chunk of {capacity} "
                           f"({group_size} x shard_numel {shard_numel}); the manifest is damaged")


def check_slot_shapes(manifest: dict, mpath: str) -> None:
    """Every slot lies within its global tensor's shape; CheckpointError naming the slot otherwise."""
    shapes = manifest["model"]["shapes"]
    for r, docs in enumerate(manifest["ranks"]):
        for i, doc in enumerate(docs):
            for j, (name, _, numel, flat) in enumerate(doc["slots"]):
                total = shape_numel(shapes[name])
                if flat + numel > total:
                    raise CheckpointError(
                        f"{mpath}: field 'ranks[{r}][{i}].slots[{j}]' holds elements [{flat}, {flat + numel}) of "
                        f"{name!r}, whose shape {shapes[name]} has {total}; the manifest is damaged"
                    )


def verify_file(path: str, name: str, manifest: dict, *, checksum: bool = True) -> None:
    """CheckpointError naming the file when it is missing, of another size, or altered."""
    info = manifest["files"].get(name)
    fpath = os.path.join(path, name)
    if info is None:
        raise CheckpointError(f"{fpath}: not listed in the manifest")
    if not os.path.isfile(fpath):
        raise CheckpointError(f"{fpath}: missing (the manifest lists it with {info['bytes']} bytes)")
    size = os.path.getsize(fpath)
    if size != info["bytes"]:
        raise CheckpointError(f"{fpath}: {size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
    if checksum and file_digest(fpath)[1] != info["sha256"]:
        raise CheckpointError(f"{fpath}: its sha256 differs from the manifest's: the file was altered or damaged")


def check_rank_file(reader: Reader, docs: list[dict], mpath: str, *, states: bool = True) -> None:
    """The tensors of one rank's shard file are those its chunks in the manifest say: `{key}.values` (and,
    with `states`, each `{key}.state.{name}`) present, sharded ones of `shard_numel` elements."""
    for doc in docs:
        wanted = [(f"{doc['key']}.values", "sharded")]
        if states:
            wanted += [(f"{doc['key']}.state.{k}", kind) for k, kind in doc["states"].items()]
        for tensor, kind in wanted:
            if tensor not in reader.tensors:
                raise CheckpointError(f"{reader.path}: has no tensor {tensor!r}, which {mpath} lists")
            numel = shape_numel(reader.shape(tensor))
            if kind == "sharded" and numel != doc["shard_numel"]:
                raise CheckpointError(
                    f"{reader.path}: tensor {tensor!r} has {numel} elements, {mpath} says shard_numel "
                    f"{doc['shard_numel']}; the checkpoint is damaged"
                )


class PieceIndex:
    """Where every range of every global tensor lives in a checkpoint: name -> [(lo, hi, file, key, file_lo)],
    global flat ranges [lo, hi) stored at elements [file_lo, ...) of tensor `{key}.values` of `file`."""

    def __init__(self, manifest: dict, mpath: str = MANIFEST) -> None:
        check_slot_shapes(manifest, mpath)  # `manifest` came from read_manifest, which checked everything else
        world = manifest["world_size"]
        self.pieces: dict[str, list[tuple[int, int, str, str, int]]] = {}
        self.chunks: dict[tuple[str, str], dict] = {}
        for r, docs in enumerate(manifest["ranks"]):
            fname = rank_file(r, world, "safetensors")
            for doc in docs:
                self.chunks[(fname, doc["key"])] = doc
                s_lo = doc["group_rank"] * doc["shard_numel"]
                s_hi = s_lo + doc["shard_numel"]
                for name, off, numel, flat in doc["slots"]:
                    lo, hi = max(off, s_lo), min(off + numel, s_hi)
                    if lo < hi:
                        piece = (flat + lo - off, flat + hi - off, fname, doc["key"], lo - s_lo)
                        self.pieces.setdefault(name, []).append(piece)
        for v in self.pieces.values():
            v.sort()

    def overlapping(self, name: str, lo: int, hi: int):
        for p in self.pieces.get(name, ()):
            if p[0] < hi and p[1] > lo:
                yield p

    def check_covered(self, name: str, lo: int, hi: int, where: str) -> None:
        covered = sum(min(p[1], hi) - max(p[0], lo) for p in self.overlapping(name, lo, hi))
        if covered != hi - lo:
            raise CheckpointError(
                f"{where}: holds {covered} of the {hi - lo} values of {name!r} [{lo}, {hi}) (damaged manifest)"
            )

    def read_range(self, readers: dict[str, Reader], name: str, lo: int, hi: int, suffix: str) -> torch.Tensor:
        """Global elements [lo, hi) of `name`'s values (suffix "values") or of a sharded optimizer state
        (suffix "state.<key>"), assembled from the pieces that hold them; `readers`: the rank files by name."""
        out = None
        for p_lo, p_hi, fname, key, f_lo in self.overlapping(name, lo, hi):
            a, b = max(p_lo, lo), min(p_hi, hi)
            part = readers[fname].read(f"{key}.{suffix}", f_lo + a - p_lo, f_lo + b - p_lo)
            if out is None:
                out = torch.empty(hi - lo, dtype=part.dtype)
            out[a - lo : b - lo].copy_(part)
        return out


def _load_torch_file(path: str):
    """torch.load(weights_only=True) of a file Elixir wrote with torch.save, bounded by its size: only the
    zip format with stored (uncompressed) entries is read, so no entry can inflate beyond the file."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                    raise CheckpointError(f"{path}: entry {info.filename!r} is compressed or larger than the file; "
                                          "it was not written by torch.save")
            bad = z.testzip()  # every entry's CRC: damage is named here, not inside the unpickler
    except CheckpointError:
        raise
    except Exception as e:  # zipfile's own complaints about a damaged archive take many forms
        raise CheckpointError(f"{path}: not a torch.save file ({str(e)[:120]}); the file is damaged") from None
    if bad is not None:
        raise CheckpointError(f"{path}: entry {bad!r} fails its CRC check; the file is damaged")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a parser of untrusted bytes fails in its own ways (see [Note: untrusted files])
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({reason}); the file is damaged") from None


def read_common(path: str) -> dict:
    """`common.pt` of a checkpoint: {"extra": anything, "scheduler": a state dict or None, "buffers":
    {name: tensor}}, checked; CheckpointError naming the file and the entry otherwise."""
    common = _load_torch_file(path)
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: holds {type(common).__name__}; expected a dict (extra, scheduler, buffers)")
    if "extra" not in common:
        raise CheckpointError(f"{path}: entry 'extra' is missing; the file is damaged")
    if "scheduler" not in common:
        raise CheckpointError(f"{path}: entry 'scheduler' is missing; the file is damaged")
    if common["scheduler"] is not None and not isinstance(common["scheduler"], dict):
        raise CheckpointError(f"{path}: entry 'scheduler' is a {type(common['scheduler']).__name__}; "
                              "expected a scheduler's state dict or None")
    buffers = common.get("buffers", {})
    if not isinstance(buffers, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in buffers.items()):
        raise CheckpointError(f"{path}: entry 'buffers' is not a dict of names to tensors; the file is damaged")
    return common


def read_rng(path: str) -> dict:
    """A rank's RNG states file, each state tried on a throwaway generator of its kind before it is
    returned, so that setting them cannot fail halfway through a load."""
    state = _load_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds {type(state).__name__}; expected a dict of RNG states")
    try:
        torch.Generator().set_state(state["torch"])
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        if "cuda" in state and not (torch.is_tensor(state["cuda"]) and state["cuda"].dtype == torch.uint8):
            raise TypeError("'cuda' is not a byte tensor")
        if "numpy" in state:
            import numpy as np  # an optional dependency

            kind, keys, pos, has_gauss, np_gauss = state["numpy"]
            np.random.RandomState().set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, np_gauss))
    except ImportError:
        pass  # saved where NumPy was, loaded where it is not: those states are not restored
    except Exception as e:  # each generator checks its own state; any complaint means a damaged file
        raise CheckpointError(f"{path}: an RNG state is damaged ({type(e).__name__}: {str(e)[:120]})") from None
    return state


def check_param_groups(saved: list[dict], groups: list[dict], mpath: str) -> None:
    """A saved hyper-parameter loads only over one of the same kind (a number over a number, a flag over a
    flag, a tuple over a sequence of as many numbers), so a damaged manifest cannot leave a string as a
    learning rate."""
    for i, (group, doc) in enumerate(zip(groups, saved)):
        for k, v in doc.items():
            if k not in group or torch.is_tensor(group[k]):
                continue
            if not _same_kind(group[k], v):
                raise CheckpointError(
                    f"{mpath}: field 'optimizer.param_groups[{i}].{k}' is {shown(v)}; the optimizer's is "
                    f"{shown(group[k])}: a value of the same kind was expected"
                )


def _same_kind(current, saved) -> bool:
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if current is None or isinstance(current, bool):
        return saved is None or isinstance(saved, bool)
    if number(current):
        return number(saved)
    if isinstance(current, (tuple, list)):
        return (isinstance(saved, list) and len(saved) == len(current)
                and all(_same_kind(c, s) for c, s in zip(current, saved)))
    if isinstance(current, str):
        return isinstance(saved, str)
    return True  # a kind JSON cannot hold was not saved as itself; nothing to compare

