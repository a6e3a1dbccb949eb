"""The eviction schedule: the order in which a step uses chunks, and who to evict.

The order is recorded during the first forward and backward (or given by a profile). While the
run follows it, the victim is the chunk whose next use is farthest away (Belady's rule, optimal
for a known sequence). When the run leaves the order (data-dependent control flow) the schedule
falls back to least-recently-used until the next step starts: never crash because the model did
something the recorded step did not.
"""

from __future__ import annotations

import bisect
import math

# how far ahead a use may be found in the order before the run counts as having left it
_RESYNC_WINDOW = 64


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
