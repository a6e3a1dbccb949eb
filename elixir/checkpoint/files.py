"""safetensors files written as a stream and read by ranges, with checksums.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a
JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then
the raw little-endian data. Because the header lists every tensor's shape before any data, a writer
that knows the names and shapes up front can write one tensor at a time, never holding them all;
and a reader can fetch any range of elements of one tensor with a seek. That is all Elixir needs,
so it reads and writes the format itself (files it writes load with `safetensors` and
`transformers`; files they write load here).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

from elixir.memory.chunk import shape_numel
from elixir.validation import Fields, json_type, load_json, shown

_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
_ALIGN = 8  # data offsets of every tensor are kept 8-byte aligned (the header is padded)


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used: missing, truncated, altered, or made for
    another model. The message names the file and the problem."""


class StreamWriter:
    """Write a safetensors file tensor by tensor, in the order of `specs`; hashes as it writes.

    specs: [(name, dtype, shape)]. Each `write(name, tensor)` must come in that order; `close()`
    checks that every tensor was written and returns (bytes, sha256 hex)."""

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._order = []
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in _CODES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
            if name in header:
                raise ValueError(f"tensor name {name!r} appears twice")
            nbytes = shape_numel(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % _ALIGN)
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._next = 0
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._next < len(self._order), f"{name!r}: every tensor of {self.path} is written already"
        want, dtype, shape, nbytes = self._order[self._next]
        assert name == want, f"tensors must be written in header order: expected {want!r}, got {name!r}"
        assert tuple(tensor.shape) == shape, f"{name!r}: shape {tuple(tensor.shape)}, header says {shape}"
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if nbytes:
            self._put(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> tuple[int, str]:
        missing = [n for n, *_ in self._order[self._next :]]
        assert not missing, f"{self.path}: tensors never written: {missing[:5]}"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._bytes, self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()


MAX_HEADER_BYTES = 100 * 2**20
"""The largest safetensors header read (the `safetensors` library refuses larger ones too): a length
field of a damaged file must not make the reader allocate what it says."""


class Reader:
    """Ranges of tensors of a safetensors file, read with seeks (nothing else is loaded).

    The header is checked whole before anything is used (see [Note: untrusted files] in
    elixir/validation.py): its length against the file's size before it is read, then every tensor's
    dtype, shape and byte range, which must lie inside the file and overlap no other tensor's."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: file not found")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes): not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: header of {n} bytes does not fit in the file's {size} bytes (truncated)"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header of {n} bytes, more than the {MAX_HEADER_BYTES} a safetensors header may have; "
                    "the file is damaged or not safetensors"
                )
            raw = f.read(n)
        header = load_json(raw, path, error=CheckpointError, what="the file is damaged")
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the header is {json_type(header)}; expected an object of tensors")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise CheckpointError(f"{path}: field '__metadata__' is {shown(metadata)}; expected an object of strings")
        self.metadata = metadata or {}
        self._data_start = 8 + n
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.tensors[name] = self._entry(name, info, size)
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.tensors.items() if end > begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file; the file is damaged")

    def _entry(self, name: str, info, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        path = self.path
        fields = Fields(info, path, error=CheckpointError, at=name)
        code = info.get("dtype")
        if not isinstance(code, str) or code not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which Elixir cannot read")
        shape = fields.get("shape", "list")
        for i, d in enumerate(shape):
            fields.check(d, f"{name}.shape[{i}]", "int", least=0)
        offsets = fields.get("data_offsets", "list")
        if len(offsets) != 2:
            raise fields.fail(f"{name}.data_offsets", f"is {shown(offsets)}; expected [begin, end]")
        begin = fields.check(offsets[0], f"{name}.data_offsets[0]", "int", least=0)
        end = fields.check(offsets[1], f"{name}.data_offsets[1]", "int", least=begin)
        if end - begin != shape_numel(shape) * _DTYPES[code].itemsize or self._data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies beyond the end of the file ({size} bytes) or has a wrong size; "
                "the file is truncated or damaged"
            )
        return _DTYPES[code], tuple(shape), begin, end

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][0]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `name`, as a new 1-D tensor."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        dtype, shape, begin, _ = self.tensors[name]
        numel = shape_numel(shape)
        stop = numel if stop is None else stop
        assert 0 <= start <= stop <= numel, f"{name!r}: range [{start}, {stop}) outside its {numel} elements"
        out = torch.empty(stop - start, dtype=dtype)
        if stop > start:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin + start * dtype.itemsize)
                buf = out.view(torch.uint8).numpy()
                if f.readinto(memoryview(buf)) != buf.nbytes:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (the file is truncated)")
        return out

    def read_tensor(self, name: str) -> torch.Tensor:
        return self.read(name).view(self.shape(name))


def file_digest(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, read in 16 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            h.update(piece)
            size += len(piece)
    return size, h.hexdigest()

