"""Memory stays flat in a long run (bench/soak.py, sized for CI): after warm-up, Elixir's counters, resident
memory, open file descriptors and threads do not grow through steps, evaluations and checkpoints, on 2 ranks
with on-demand chunks whose parameters and optimizer live on the host."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.dist
def test_two_ranks_host_chunks_keep_memory_flat(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "bench" / "soak.py"), "--job", "tiny", "--steps", "300", "--sample-every", "10",
                           "--warmup", "50", "--save-every", "50", "--eval-every", "30", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["flat"] and r["samples"] >= 25, r
        assert r["host_bytes"][0] == r["host_bytes"][1] > 0  # the host chunks are there, and do not grow
        assert r["rss_first_last_mib"][1] - r["rss_first_last_mib"][0] <= 4.0, r
