"""The eviction schedule: the order in which a step uses chunks, who to evict and what to prefetch.

The order is recorded during the first forward and backward (or given by a profile). While the
run follows it, the victim is the chunk whose next use is farthest away (Belady's rule, optimal
for a known sequence). When the run leaves the order (data-dependent control flow) the schedule
falls back to least-recently-used until the next step starts: never crash because the model did
something the recorded step did not.

[Note: one policy for the runtime and the cost model]
The runtime (elixir/runtime/state.py) and the cost model (elixir/search/cost.py) make the same
decisions through this module: `EvictionSchedule.victim` chooses whom a fetch evicts,
`EvictionSchedule.prefetch` which chunks start fetching ahead and when a prefetch may displace a
cached chunk, and `REDUCTIONS_IN_FLIGHT` how many gradient reductions run behind backward. The
runtime drives the policy with its block cache; the cost model replays the profiled order through a
`CacheView` of its own, so a prediction follows the same schedule as the step it predicts.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from typing import Protocol

# how far ahead a use may be found in the order before the run counts as having left it
_RESYNC_WINDOW = 64

REDUCTIONS_IN_FLIGHT = 2
"""Gradient reductions (reduce-scatters, each holding a whole-chunk fp32 buffer) left in flight during
backward before the oldest is waited for."""


class CacheView(Protocol):
    """What the policy asks of a cache of blocks, chunks named by their index."""

    def is_cached(self, chunk: int) -> bool:
        """Whether the chunk holds a block (gathered, or being gathered)."""

    def has_free_block(self) -> bool: ...

    def evictable(self) -> list[int]:
        """Chunks in blocks that nothing uses now (unpinned)."""

    def last_use(self, chunk: int) -> int:
        """When the chunk was last used (a counter that grows with every use)."""

    def evict(self, chunk: int) -> None: ...

    def start_prefetch(self, chunk: int) -> None:
        """Start fetching the chunk into a free block."""


def use_order(names: Iterable[str], chunk_of: Mapping[str, int]) -> list[int]:
    """The chunks of a sequence of parameter uses, in order, consecutive repeats removed; names that
    `chunk_of` lacks (resident chunks' parameters) are skipped."""
    order: list[int] = []
    for name in names:
        c = chunk_of.get(name)
        if c is not None and (not order or order[-1] != c):
            order.append(c)
    return order


class EvictionSchedule:
    def __init__(self) -> None:
        self.order: list[int] | None = None
        self._positions: dict[int, list[int]] = {}
        self._recording: list[int] | None = None
        self._recorded_backward = False
        self.cursor = -1
        self.on_order = False
        self.left_order = 0  # steps (forwards) that left the order: a statistic
        self._last: int | None = None

    def set_order(self, order: list[int]) -> None:
        dedup = [c for i, c in enumerate(order) if i == 0 or order[i - 1] != c]
        self.order = dedup
        self._positions = {}
        for i, c in enumerate(dedup):
            self._positions.setdefault(c, []).append(i)
        self._recording = None

    def start_forward(self) -> None:
        """A new forward begins: follow the order from its start (or record it)."""
        if self.order is None and (self._recording is None or not self._recorded_backward):
            self._recording, self._recorded_backward = [], False
        self.cursor, self._last = -1, None
        self.on_order = self.order is not None

    def saw_backward(self) -> None:
        self._recorded_backward = True

    def end_backward(self) -> None:
        if self._recording is not None and self._recorded_backward:
            self.set_order(self._recording)

    def abandon_backward(self) -> None:
        """A backward raised before its end: what it recorded is partial, the next step records anew."""
        if self._recording is not None:
            self._recording, self._recorded_backward = None, False

    @property
    def recording(self) -> bool:
        return self._recording is not None

    def use(self, chunk: int) -> bool:
        """Record a use of `chunk`; True when the position in the order moved."""
        if chunk == self._last:
            return False
        self._last = chunk
        if self._recording is not None:
            self._recording.append(chunk)
            return False
        if not self.on_order:
            return False
        order = self.order
        stop = min(len(order), self.cursor + 1 + _RESYNC_WINDOW)
        for j in range(self.cursor + 1, stop):
            if order[j] == chunk:
                self.cursor = j
                return True
        self.on_order = False
        self.left_order += 1
        return False

    def next_use(self, chunk: int) -> float:
        """Position of the chunk's next use after the cursor (inf: not again in this step)."""
        pos = self._positions.get(chunk)
        if not pos:
            return math.inf
        i = bisect.bisect_right(pos, self.cursor)
        return pos[i] if i < len(pos) else math.inf

    def victim(self, candidates: list[int], last_use) -> int:
        """Whom to evict of `candidates` (chunk indices): on the order, the one used again farthest ahead
        (Belady), the least recently used (`last_use(chunk)`) among those not used again; off the order,
        the least recently used."""
        if self.on_order:
            return max(candidates, key=lambda c: (self.next_use(c), -last_use(c)))
        return min(candidates, key=last_use)

    def prefetch(self, cache: CacheView, depth: int) -> None:
        """Start fetching the next `depth` distinct chunks of the order that `cache` does not hold, into free
        blocks, or in place of a chunk whose next use comes later (Belady: a prefetch never displaces a
        chunk needed sooner than the one fetched). Stops at the first chunk that finds no room."""
        for c in self.upcoming(depth):
            if cache.is_cached(c):
                continue
            if not cache.has_free_block():
                candidates = cache.evictable()
                if not candidates:
                    return
                victim = self.victim(candidates, cache.last_use)
                if self.next_use(victim) <= self.next_use(c):
                    return
                cache.evict(victim)
            cache.start_prefetch(c)

    def upcoming(self, count: int) -> list[int]:
        """The next `count` distinct chunks in the order after the cursor."""
        if not self.on_order or count <= 0:
            return []
        out: list[int] = []
        seen: set[int] = set()
        for c in self.order[self.cursor + 1 :]:
            if c not in seen:
                seen.add(c)
                out.append(c)
                if len(out) == count:
                    break
        return out
