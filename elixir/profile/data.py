"""What one traced training step does: `Profile` (operators, parameter uses, FLOPs, bytes) and `OpRecord`.

Made by `profile` (elixir/profile/trace.py, which has the Notes on how each figure is traced); read by the
planner (elixir/search/) and saved as JSON (`Profile.to_json`, `Profile.from_json`).

[Note: a profile at another batch size]
The planner compares micro-batch sizes without tracing each: `Profile.scaled(f)` is the profile of f times as
many sequences of the same length. What grows with the sequences is scaled: FLOPs (every operator's work is
linear in the tokens at a fixed sequence length, attention included), the bytes operators create, the live
activation bytes and their peak, the bytes of all-to-alls. What does not is kept: the operator sequence, the
parameters each reads, gradient arrivals, gradient bytes (parameter-sized). Every storage of the step is
a * sequences + c bytes, and c is not zero for a few: position ids, masks of (T, T), and a parameter's gradient
between the operator that makes it and its accumulation into `.grad`. Scaling multiplies c too, so a profile
scaled up (f > 1) overstates activation bytes by (f - 1) * c, never understates them: the planner profiles
one sequence and scales up. For OPT-30B at 2048 tokens with every block checkpointed the peak is 3.07 GB at one
sequence (while the last block recomputes, a 0.41 GB weight gradient of its MLP alive), 21.6 GB at eight, and
8 x 3.07 = 24.6 GB scaled: 14% over; without checkpointing, where activations dwarf such terms, two sequences
trace at 2.0000 x one. FLOPs scale exactly. A model whose operator sequence depends on the batch size (a copy
that one sequence does not need) differs by those operators.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

__all__ = ["OpRecord", "Profile"]

_FORMAT_VERSION = 2
_PHASES = ("forward", "backward")


@dataclass(slots=True)
class OpRecord:
    """One aten operator of the profiled step."""

    name: str
    """The operator overload, e.g. "aten.mm.default"."""
    phase: str
    """"forward", or "backward" for operators run during `.backward()` (checkpoint recomputation included)."""
    params: tuple[str, ...]
    """Names of the parameters whose storage it reads or writes (views included), in argument order."""
    flops: int
    """Floating point operations by torch.utils.flop_counter's formulas; 0 for operators it has none for."""
    live_activation_bytes: int
    """Bytes of all live non-parameter storages right after the operator (inputs and outputs both alive)."""
    live_grad_bytes: int = 0
    """Bytes of parameter gradients (`.grad`) alive right after the operator."""
    out_bytes: int = 0
    """Bytes of the storages the operator created (its outputs that are not views)."""
    moved_bytes: int | None = None
    """Bytes the operator reads and writes: its tensor arguments and outputs, 0 for a view (see
    [Note: what a memory-bound operator costs]); None in profiles made before it was recorded."""


@dataclass
class Profile:
    """What one training step does, traced on the meta device (see `profile`)."""

    ops: list[OpRecord]
    """Every aten operator of the step, in order."""
    param_shapes: dict[str, tuple[int, ...]]
    """Shape of every distinct parameter, by first name, in registration order."""
    param_numels: dict[str, int]
    """Number of elements of every distinct parameter."""
    peak_activation_bytes: int
    """Largest `live_activation_bytes` over the step."""
    forward_flops: int
    """FLOPs of the forward phase (loss included)."""
    backward_flops: int
    """FLOPs of the backward phase (checkpoint recomputation included)."""
    total_flops: int
    """forward_flops + backward_flops."""
    param_dtypes: dict[str, str] = field(default_factory=dict)
    """dtype name of every parameter as traced ("bfloat16" when profiled with that compute dtype)."""
    tied_names: dict[str, str] = field(default_factory=dict)
    """Other names of tied parameters -> the first name, under which they appear everywhere else."""
    peak_grad_bytes: int = 0
    """Largest `live_grad_bytes` over the step: all gradients, as plain PyTorch keeps them."""
    assumed_values: int = 0
    """Times the model read a tensor's value (`.item()`, `if tensor:`), each answered with True / 1 / 1.0:
    see [Note: values read on the meta device] in elixir/profile/trace.py."""
    trace_seconds: float = 0.0
    """Wall time the trace took."""
    grad_arrivals: dict[str, list[int]] = field(default_factory=dict)
    """For every trainable parameter (first name): when its gradient was accumulated into `.grad`, as the number
    of operators recorded before (the gradient is complete after `ops[i - 1]`); more than one entry only when
    autograd accumulates it several times (e.g. reentrant checkpointing). What the runtime's gradient
    buffers follow: a chunk's buffer is taken at its first parameter's arrival, reduced at its last."""
    all_to_all: list[tuple[int, int]] = field(default_factory=list)
    """The all-to-alls of expert-parallel layers in the step, forward and backward: (ranks in the group,
    bytes this rank sends to the others), routing assumed balanced (see elixir/parallel/moe.py)."""

    # ---- orders of use ----

    def param_order(self) -> list[str]:
        """Parameter names in order of first use: forward, then those first used in backward, then any
        never used, in registration order (chunks must hold them too)."""
        seen: dict[str, None] = {}
        for phase in _PHASES:
            for op in self.ops:
                if op.phase == phase:
                    for name in op.params:
                        seen.setdefault(name, None)
        for name in self.param_shapes:
            seen.setdefault(name, None)
        return list(seen)

    def use_sequence(self) -> list[str]:
        """Parameter names in order of every use over the step, consecutive repeats removed."""
        sequence: list[str] = []
        for op in self.ops:
            for name in op.params:
                if not sequence or sequence[-1] != name:
                    sequence.append(name)
        return sequence

    def chunk_sequence(self, chunk_of: Mapping[str, int]) -> list[int]:
        """Chunk indices in order of use over the step, consecutive repeats removed: the order the
        eviction schedule follows. `chunk_of` maps every parameter name (first or tied names) to its chunk."""
        resolved = {self.tied_names.get(name, name): chunk for name, chunk in chunk_of.items()}
        missing = [name for name in self.param_shapes if name not in resolved]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ValueError(
                f"chunk_of has no chunk for {len(missing)} parameter(s): {shown}; map every parameter of the "
                "profiled model to a chunk index"
            )
        sequence: list[int] = []
        for name in self.use_sequence():
            chunk = resolved[name]
            if not sequence or sequence[-1] != chunk:
                sequence.append(chunk)
        return sequence

    # ---- other batch sizes ----

    def scaled(self, factor: float) -> Profile:
        """This profile for `factor` times as many sequences (same sequence length): see
        [Note: a profile at another batch size]."""
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise ValueError(
                f"factor={factor!r} must be a positive number: the ratio of the wanted sequences per micro-batch "
                "to those profiled"
            )
        if factor == 1:
            return dataclasses.replace(self, ops=list(self.ops))
        ops = [
            OpRecord(op.name, op.phase, op.params, round(op.flops * factor), round(op.live_activation_bytes * factor),
                     op.live_grad_bytes, round(op.out_bytes * factor),
                     None if op.moved_bytes is None else round(op.moved_bytes * factor))
            for op in self.ops
        ]
        forward_flops = sum(op.flops for op in ops if op.phase == "forward")
        backward_flops = sum(op.flops for op in ops if op.phase == "backward")
        return dataclasses.replace(
            self,
            ops=ops,
            peak_activation_bytes=round(self.peak_activation_bytes * factor),
            forward_flops=forward_flops,
            backward_flops=backward_flops,
            total_flops=forward_flops + backward_flops,
            all_to_all=[(ranks, round(nbytes * factor)) for ranks, nbytes in self.all_to_all],
        )

    # ---- reporting ----

    @property
    def num_params(self) -> int:
        """Number of distinct parameter elements."""
        return sum(self.param_numels.values())

    def summary(self) -> str:
        """A few lines for people: sizes, FLOPs, activation peak, where it happens."""
        n_forward = sum(op.phase == "forward" for op in self.ops)
        peak_at = max(range(len(self.ops)), key=lambda i: self.ops[i].live_activation_bytes, default=None)
        lines = [
            f"parameters       {self.num_params:,} in {len(self.param_shapes)} tensors"
            + (f" ({len(self.tied_names)} tied names)" if self.tied_names else ""),
            f"operators        {len(self.ops):,} ({n_forward:,} forward, {len(self.ops) - n_forward:,} backward)",
            f"FLOPs            {_human(self.total_flops, 1000)} "
            f"(forward {_human(self.forward_flops, 1000)}, backward {_human(self.backward_flops, 1000)})",
            f"activation peak  {_human(self.peak_activation_bytes, 1024)}B",
            f"gradients peak   {_human(self.peak_grad_bytes, 1024)}B",
        ]
        if peak_at is not None:
            op = self.ops[peak_at]
            lines.append(f"peak at op       #{peak_at} {op.name} ({op.phase})")
        lines.append(f"traced in        {self.trace_seconds:.2f} s")
        return "\n".join(lines)

    # ---- JSON ----

    def to_json(self) -> str:
        """The profile as JSON; operators as compact rows [name, phase, params, flops, activation bytes,
        gradient bytes, output bytes, moved bytes]."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["ops"] = [
            [op.name, op.phase, list(op.params), op.flops, op.live_activation_bytes, op.live_grad_bytes, op.out_bytes,
             op.moved_bytes]
            for op in self.ops
        ]
        data["param_shapes"] = {name: list(shape) for name, shape in self.param_shapes.items()}
        data["format_version"] = _FORMAT_VERSION
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        version = data.pop("format_version", None)
        if version not in (1, _FORMAT_VERSION) or isinstance(version, bool):
            raise ValueError(
                f"profile format_version={version!r}, this elixir reads 1 to {_FORMAT_VERSION}; profile the model again"
            )
        data["ops"] = [  # version 1 rows have no moved bytes
            OpRecord(row[0], row[1], tuple(row[2]), *row[3:7], row[7] if len(row) > 7 else None)
            for row in data["ops"]
        ]
        data["param_shapes"] = {name: tuple(shape) for name, shape in data["param_shapes"].items()}
        data["all_to_all"] = [tuple(t) for t in data.get("all_to_all", ())]
        return cls(**data)


def _human(value: float, base: int) -> str:
    """1234567 -> "1.2 M" (base 1000) or "1.2 Mi" (base 1024)."""
    suffix = "i" if base == 1024 else ""
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(value) < base or unit == "P":
            return f"{value:.1f} {unit}{suffix}" if unit else f"{value:.0f} "
        value /= base
    raise AssertionError("unreachable")
