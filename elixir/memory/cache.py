"""The block cache: a fixed number of equal device blocks, allocated once.

Gathered on-demand chunks live in these blocks and nowhere else on the device, so the device memory
for gathered parameters never exceeds `num_blocks * block_numel` elements, whatever the model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elixir.memory.tracker import MemoryTracker


@dataclass(eq=False)
class Block:
    index: int
    buffer: torch.Tensor
    chunk: object | None = None


class BlockCache:
    """Blocks and which chunk each holds. Which chunk to evict is the schedule's decision."""

    def __init__(self, num_blocks: int, block_numel: int, dtype: torch.dtype, tracker: MemoryTracker):
        self.block_numel = block_numel
        self.dtype = dtype
        self.tracker = tracker
        self.blocks = [Block(i, tracker.empty(block_numel, dtype, "device", share=True)) for i in range(num_blocks)]
        self._free = list(reversed(self.blocks))
        # storage address -> block: how saved tensors are recognised as views of a chunk
        self.by_storage = {b.buffer.untyped_storage().data_ptr(): b for b in self.blocks}
        self.planned_blocks = num_blocks  # the plan's; `grow` adds overflow blocks beyond them

    def grow(self) -> Block:
        """One more block, free, kept from now on (counted like the others): the overflow that lets a step
        finish when every block holds a chunk in use (see [Note: pins] in elixir/runtime/state.py)."""
        block = Block(len(self.blocks), self.tracker.empty(self.block_numel, self.dtype, "device", share=True))
        self.blocks.append(block)
        self.by_storage[block.buffer.untyped_storage().data_ptr()] = block
        self._free.append(block)
        return block

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self._free)

    def take(self) -> Block | None:
        return self._free.pop() if self._free else None

    def give_back(self, block: Block) -> None:
        assert block.chunk is None and block not in self._free
        self._free.append(block)

    def occupied(self):
        return [b for b in self.blocks if b.chunk is not None]
