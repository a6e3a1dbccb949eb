"""The module tests/chaos.py has torchrun start: `python -m elixir`, with one fault armed by the environment.

CHAOS_KILL_IN_LOAD="RANK:N" makes that rank SIGKILL itself at the N-th read of a tensor range during
`elixir.load` (after writing "load" to CHAOS_MARK, so the driver knows where the kill fell). A load of a small
checkpoint is over in milliseconds, too fast to catch from outside; the kill itself is the real thing.
Without the variable this is exactly `python -m elixir`.
"""

from __future__ import annotations

import os
import signal


def arm() -> None:
    spec = os.environ.get("CHAOS_KILL_IN_LOAD")
    if not spec:
        return
    rank, nth = (int(v) for v in spec.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return
    from elixir.checkpoint.manifest import PieceIndex

    real, calls = PieceIndex.read_range, [0]

    def read_range(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            with open(os.environ["CHAOS_MARK"], "w") as f:
                f.write("load")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    PieceIndex.read_range = read_range


if __name__ == "__main__":
    arm()
    from elixir.cli import console

    console()
