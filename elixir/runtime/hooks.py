"""Parameter interception: every use of a managed parameter finds its chunk gathered.

[Note: where parameters are used]
- In a module's forward, by the module that owns them: a forward pre-hook on every module with
  on-demand parameters gathers and pins its chunks; the post-hook unpins them. The same hooks fire
  when activation checkpointing recomputes a region in backward (then the pins are recompute pins,
  see [Note: pins] in state.py).
- Anywhere else in the forward (a tied embedding used as the output layer by the parent module, a
  parameter read by a sibling): a `TorchFunctionMode`, active only during the root forward, looks at
  the top-level arguments of each op and gathers any on-demand parameter not yet gathered.
- In backward, through tensors autograd saved: views of a cache block are packed as (chunk, size,
  stride, offset) handles by `saved_tensors_hooks` and unpacked by gathering the chunk, possibly into
  another block, and rebuilding the view. No copy is made.
Models whose chunks are all resident need none of this: their parameters are always views of
device memory, and no hook but the gradient hooks is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from elixir.memory import Chunk, ChunkState
from elixir.runtime.state import Runtime

# The runtime's own tensor work (binding views, copies) must not be seen by the mode.
_quiet = torch._C.DisableTorchFunction
_graph_task_id = torch._C._current_graph_task_id
_current_node = torch._C._current_autograd_node


def _in_backward() -> bool:
    return _graph_task_id() != -1


@dataclass(frozen=True, slots=True)
class SavedView:
    """A saved view of a gathered chunk, to be rebuilt in backward wherever the chunk then is."""

    chunk: Chunk
    size: torch.Size
    stride: tuple[int, ...]
    storage_offset: int


class ParamUseMode(TorchFunctionMode):
    """Gathers on-demand parameters used by ops outside their own module's forward."""

    def __init__(self, runtime: Runtime, chunk_of: dict[int, Chunk]) -> None:
        super().__init__()
        self.runtime = runtime
        self.chunk_of = chunk_of

    def _touch(self, a) -> None:
        c = self.chunk_of.get(id(a))
        if c is not None and (c.state is not ChunkState.GATHERED or c.pending is not None):
            with _quiet():
                self.runtime.acquire(c)
            self.runtime.soft_pin(c)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        chunk_of = self.chunk_of
        for a in args:
            if type(a) in (list, tuple):
                for b in a:
                    if id(b) in chunk_of:
                        self._touch(b)
            elif id(a) in chunk_of:
                self._touch(a)
        if kwargs:
            for a in kwargs.values():
                if id(a) in chunk_of:
                    self._touch(a)
        return func(*args, **kwargs)


class Interceptor:
    """Installs and runs the hooks of [Note: where parameters are used] for one model."""

    def __init__(self, runtime: Runtime, model: torch.nn.Module, chunk_of: dict[int, Chunk]) -> None:
        self.runtime = runtime
        self.chunk_of = chunk_of  # id(param) -> chunk, on-demand parameters only
        self.cache = runtime.cache
        self._contexts: list = []
        self._stack: list[tuple[list[Chunk], bool]] = []
        for module in model.modules():
            chunks: list[Chunk] = []
            for p in module.parameters(recurse=False):
                c = chunk_of.get(id(p))
                if c is not None and c not in chunks:
                    chunks.append(c)
            if chunks or module is model:
                pre = self._make_pre(chunks, module is model)
                if module is model:
                    self.root_pre = pre  # (see [Note: planning on the first forward] in wrap.py)
                module.register_forward_pre_hook(pre)
                module.register_forward_hook(self._make_post(module is model), always_call=True)

    # --- module hooks ------------------------------------------------------------------------

    def _make_pre(self, chunks: list[Chunk], is_root: bool):
        rt = self.runtime

        def pre(module, args):
            backward = _in_backward()
            if is_root and not backward:
                rt.schedule.start_forward()
                self._enter_forward()
            rt.release_soft_pins()
            pinned: list[Chunk] = []
            if backward:
                rt.enter_backward()
                node = _current_node()
                rt.new_node(node)
                rt.start_recompute(node)
            self._stack.append((pinned, backward))
            with _quiet():
                for c in chunks:
                    rt.acquire(c)
                    if backward:
                        rt.recompute_pin(c)
                    else:
                        rt.pin(c)
                        pinned.append(c)

        return pre

    def _make_post(self, is_root: bool):
        rt = self.runtime

        def post(module, args, output):
            chunks, backward = self._stack.pop()
            rt.release_soft_pins()
            if not backward:
                for c in chunks:
                    rt.unpin(c)
            if is_root and not backward:
                self._exit_forward()
                if not torch.is_grad_enabled():
                    # no backward follows (evaluation, generation): finish the prefetches now, so
                    # none is left in flight when the caller moves on or tears its group down
                    rt.wait_pending()

        return post

    def _enter_forward(self) -> None:
        assert not self._contexts, "nested root forward"
        ctxs = [ParamUseMode(self.runtime, self.chunk_of)]
        if torch.is_grad_enabled():
            ctxs.append(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        for c in ctxs:
            c.__enter__()
        self._contexts = ctxs

    def _exit_forward(self) -> None:
        for c in reversed(self._contexts):
            c.__exit__(None, None, None)
        self._contexts = []

    # --- saved tensors -----------------------------------------------------------------------

    def _pack(self, t: torch.Tensor):
        block = self.cache.by_storage.get(t.untyped_storage().data_ptr())
        if block is None or block.chunk is None:
            return t
        return SavedView(block.chunk, t.size(), t.stride(), t.storage_offset())

    def _unpack(self, saved):
        if type(saved) is not SavedView:
            return saved
        rt = self.runtime
        rt.enter_backward()
        c = saved.chunk
        node = _current_node()
        rt.new_node(node)  # the previous node is done with its views: free them before fetching
        with _quiet():
            rt.acquire(c)
        rt.node_pin(c, node)
        return c.block.buffer.as_strided(saved.size, saved.stride, saved.storage_offset)
