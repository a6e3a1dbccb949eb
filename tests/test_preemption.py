"""Preemption: a signal stops `elixir train` after a whole step, saved, with the resumable exit status, and the
same command relaunched with `--resume auto` ends bit for bit where an uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import elixir
from elixir.checkpoint.weights import export_checkpoint

ARGS = ["train", "--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--eval-batches",
        "1", "--on-demand", "--chunk-mib", "0.05", "--cache-blocks", "2", "--hardware", "CPU", "--log-every", "1",
        "--clip", "1.0"]
STEPS = 40


def _env():
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _records(out) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and '"loss"' in line]


def _weights(ckpt, tmp_path, name) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = tmp_path / f"{name}.safetensors"
    export_checkpoint(str(ckpt), str(out))
    return load_file(str(out))


@pytest.mark.dist
def test_the_flag_is_per_event_and_a_second_signal_exits_at_once():
    script = textwrap.dedent("""
        import os, signal, sys, time
        import elixir
        from elixir import preempt
        with elixir.Preemption() as stop:
            assert not stop.requested() and not stop.received
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # the same event reaching the process twice: still running
            assert stop.requested() and stop.signal_name == "SIGUSR1"
            print("stopping", flush=True)
            preempt.SAME_EVENT_S = 0.0
            os.kill(os.getpid(), signal.SIGTERM)  # a second request: out now
            time.sleep(5)
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stdout.strip() == "stopping"
    assert "SIGUSR1 received: stopping after this step" in done.stderr
    assert "SIGTERM again: exiting now" in done.stderr
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (this process's handlers are its own)


def test_handlers_are_restored_and_the_main_thread_is_required():
    before = signal.getsignal(signal.SIGINT)
    with elixir.Preemption():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
    import threading

    errors = []

    def enter():
        try:
            with elixir.Preemption():
                pass
        except ValueError as e:
            errors.append(str(e))

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_after_the_step_and_resume_auto_ends_bit_identical(tmp_path, sig):
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = subprocess.run([sys.executable, "-m", "elixir", *ARGS, "--steps", str(STEPS), "--out", str(full),
                           "--quiet"], env=_env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    cmd = [sys.executable, "-m", "elixir", *ARGS, "--steps", str(STEPS), "--out", str(cut), "--resume", "auto"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(_records(cut)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == elixir.EXIT_PREEMPTED, stderr[-3000:]
    stopped = len(_records(cut))
    assert 3 <= stopped < STEPS
    assert f"stopped after step {stopped} of {STEPS} on {signal.Signals(sig).name}: saved to" in stdout
    manifest = json.loads((cut / "last" / "manifest.json").read_text())
    assert manifest["optimizer"]["steps"] == stopped

    again = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {cut / 'last'} at step {stopped}" in again.stdout
    a, b = _weights(full / "last", tmp_path, "full"), _weights(cut / "last", tmp_path, "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    losses = [r["loss"] for r in _records(cut)]
    assert losses == [r["loss"] for r in _records(full)]  # every step logged once, with the same loss
    if sig == signal.SIGTERM:  # a relaunch loop that runs the command once more ends there, changing nothing
        before = {f.name: f.read_bytes() for f in (cut / "last").iterdir()}
        third = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
        assert third.returncode == 0, third.stderr[-3000:]
        assert f"is at step {STEPS} of --steps {STEPS} already: nothing to train" in third.stdout
        assert {f.name: f.read_bytes() for f in (cut / "last").iterdir()} == before
        assert len(_records(cut)) == STEPS


@pytest.mark.dist
def test_without_out_a_signal_stops_with_the_signals_status(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "elixir", *ARGS, "--steps", "400", "--json",
                             str(tmp_path / "r.json")], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    line = ""
    while "step" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "nothing saved (no --out)" in stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["preempted"] == "SIGTERM" and not result["saved"] and result["steps"] < 400


@pytest.mark.dist
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    from chaos import records, workers

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "elixir", *ARGS,
           "--steps", "400", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(records(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = sorted(workers(proc.pid))
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGUSR1)  # one rank only, as a scheduler signalling one node would
    stdout, stderr = proc.communicate(timeout=240)
    assert "exitcode  : 75" in stderr  # each worker's status (torchrun's own says that workers ended early)
    stopped = max(records(out))
    assert f"stopped after step {stopped} of 400 on SIGUSR1: saved to" in stdout
    assert json.loads((out / "last" / "manifest.json").read_text())["optimizer"]["steps"] == stopped
