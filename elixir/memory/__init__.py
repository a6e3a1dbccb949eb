"""Chunks, the block cache and the eviction schedule: bytes and buffers, no modules."""

from elixir.memory.cache import Block, BlockCache
from elixir.memory.chunk import Chunk, ChunkGroup, ChunkState, pack_offsets
from elixir.memory.schedule import REDUCTIONS_IN_FLIGHT, CacheView, EvictionSchedule, use_order
from elixir.memory.tracker import TIERS, MemoryTracker

__all__ = [
    "REDUCTIONS_IN_FLIGHT",
    "TIERS",
    "Block",
    "BlockCache",
    "CacheView",
    "Chunk",
    "ChunkGroup",
    "ChunkState",
    "EvictionSchedule",
    "MemoryTracker",
    "pack_offsets",
    "use_order",
]
