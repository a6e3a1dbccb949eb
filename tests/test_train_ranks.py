"""`elixir train` under torchrun: N ranks on the global batch train like one process."""

import json
import os
import subprocess
import sys

import pytest

ARGS = ["train", "--model", "tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
        "--eval-batches", "1", "--quiet", "--on-demand", "--chunk-mib", "0.05", "--cache-blocks", "2",
        "--hardware", "CPU"]


def _env():
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2])
def test_torchrun_matches_one_process(tmp_path, nproc):
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    subprocess.run([sys.executable, "-m", "elixir", *ARGS, "--json", str(one)], check=True, env=_env(), timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    done = subprocess.run([*torchrun, "-m", "elixir", *ARGS, "--json", str(many)], env=_env(), timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(many.read_text())
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


@pytest.mark.dist
def test_only_rank_zero_prints(tmp_path):
    args = [a for a in ARGS if a != "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run([*torchrun, "-m", "elixir", *args], env=_env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: train loss") == 1
    assert "2 rank(s)" in done.stdout
