"""Crash at any step, nothing lost: a multi-rank `elixir train --save-every N --resume auto` has one of its ranks
killed with SIGKILL again and again (at a random step, while a checkpoint is being written, while one is being
read), is relaunched with the same command each time, and must end with parameters bit for bit those of an
uninterrupted run of the same length, and the same loss at every step.

tests/test_chaos.py runs a short schedule; for a soak run:

    GLOO_SOCKET_IFNAME=lo python tests/chaos.py --kills 30 --steps 300 --seed 7

A worker is caught writing a checkpoint by its open files: a descriptor into `last.tmp/`, read from /proc at a
few-millisecond cadence (Linux only). A load of a small checkpoint is too quick for that: the victim rank kills
itself at a random read inside `elixir.load` (tests/chaos_worker.py, the module torchrun starts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["train", "--model", "small", "--batch-size", "4", "--seq-len", "64", "--eval-every", "0", "--eval-batches",
        "1", "--on-demand", "--chunk-mib", "1", "--cache-blocks", "3", "--hardware", "CPU", "--log-every", "1",
        "--clip", "1.0", "--timeout", "30", "--quiet"]
KINDS = ("step", "save", "load")


def env(**extra) -> dict:
    here = str(Path(__file__).resolve().parent)  # chaos_worker's folder
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path, **extra}


def command(out: Path, steps: int, save_every: int, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--monitor-interval=0.1", "-m", "chaos_worker", *ARGS, "--steps", str(steps), "--out", str(out),
            "--save-every", str(save_every), "--resume", "auto"]


def records(out: Path) -> dict[int, float]:
    """step -> loss of the last record of each step (a step logged, then lost to a kill and run again, counts
    as its rerun)."""
    path = out / "metrics.jsonl"
    found: dict[int, float] = {}
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # the half line of a killed writer
        if "loss" in r:
            found[r["step"]] = r["loss"]
    return found


def workers(pid: int) -> list[int]:
    """The ranks torchrun started (its child processes)."""
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def has_open_under(pid: int, folder: Path) -> bool:
    prefix = str(folder) + os.sep
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def launch_and_kill(out: Path, steps: int, save_every: int, nproc: int, kind: str, rng: random.Random,
                    log, timeout: float, nth_save: int | None = None) -> str | None:
    """One launch; kill a random rank at the moment `kind` names (a save: the `nth_save`-th of the launch, by
    default the first or the second at random). Returns what was killed ("step 12", "save", "load") or None
    when the run finished first."""
    done_before = max(records(out), default=0)
    target = done_before + rng.randint(1, 2 * save_every)  # before a save, or after one
    mark = out.parent / "killed-in-load"
    mark.unlink(missing_ok=True)
    armed = {"CHAOS_KILL_IN_LOAD": f"{rng.randrange(nproc)}:{rng.randint(1, 4)}", "CHAOS_MARK": str(mark)}
    with open(out.parent / "launches.log", "a") as f:
        proc = subprocess.Popen(command(out, steps, save_every, nproc), env=env(**armed) if kind == "load" else env(),
                                stdout=f, stderr=f)
    deadline = time.monotonic() + timeout
    killed = None
    nth_save = nth_save or rng.randint(1, 2)
    saves_seen: set[int] = set()  # a save is told apart from the next by the step it follows
    while proc.poll() is None and time.monotonic() < deadline:
        ranks = workers(proc.pid)
        if len(ranks) == nproc:
            victim = rng.choice(ranks)
            writing = kind == "save" and any(has_open_under(r, out / "last.tmp") for r in ranks)
            if writing:
                saves_seen.add(max(records(out), default=0))
            if kind == "step" and max(records(out), default=0) >= target:
                killed = f"step {max(records(out))}"
            elif writing and len(saves_seen) == nth_save:
                killed = "save"
            if killed:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.002)
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"a launch did not end within {timeout:.0f} s after a kill at {killed}: a hang") from None
    if kind == "load" and mark.exists():
        killed = "load"
    log(f"launch: {kind:<4} -> {killed or 'finished first'} (exit {proc.returncode})")
    return killed


def run(work: Path, *, steps: int, save_every: int, kills: int, seed: int, nproc: int = 2,
        timeout: float = 300.0, log=print) -> dict:
    """The whole experiment; returns {"kills": [...], "identical": bool, "steps_compared": n, ...}."""
    from safetensors.torch import load_file

    from elixir.checkpoint.weights import export_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ref, cut = work / "reference", work / "chaos"
    t0 = time.monotonic()
    done = subprocess.run(command(ref, steps, save_every, nproc), env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
    log(f"uninterrupted run: {time.monotonic() - t0:.0f} s")
    # the schedule: every kind early (a load needs a checkpoint, so not first), then at random
    schedule = ["step", "load", "save"] + [rng.choice(KINDS) for _ in range(max(0, kills - 3))]
    history = []
    from elixir.cli.train.flags import checkpoint_path

    for kind in schedule[:kills]:
        if max(records(cut), default=0) >= steps and checkpoint_path(str(cut)):
            break  # the run got to its end between kills
        if kind == "load" and checkpoint_path(str(cut)) is None:
            # nothing to load yet: a launch killed during its second save leaves the first one to load
            killed = launch_and_kill(cut, steps, save_every, nproc, "save", rng, log, timeout, nth_save=2)
            if killed:
                history.append(killed)
        killed = launch_and_kill(cut, steps, save_every, nproc, kind, rng, log, timeout)
        if killed:
            history.append(killed)
    final = subprocess.run(command(cut, steps, save_every, nproc), env=env(), capture_output=True, text=True,
                           timeout=timeout)
    if final.returncode != 0:
        raise RuntimeError(f"the last relaunch failed:\n{final.stderr[-3000:]}")
    a, b = records(ref), records(cut)
    wa = load_file(export_checkpoint(str(ref / "last"), str(work / "ref.safetensors"))[0])
    wb = load_file(export_checkpoint(str(cut / "last"), str(work / "cut.safetensors"))[0])
    identical = wa.keys() == wb.keys() and all(bool((wa[n] == wb[n]).all()) for n in wa)
    return {"kills": history, "identical": identical, "same_losses": a == b, "steps": steps,
            "steps_logged": len(b), "elapsed_s": time.monotonic() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="chaos-run")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    result = run(Path(a.work).resolve(), steps=a.steps, save_every=a.save_every, kills=a.kills, seed=a.seed,
                 nproc=a.nproc)
    print(json.dumps(result, indent=1))
    return 0 if result["identical"] and result["same_losses"] else 1


if __name__ == "__main__":
    sys.exit(main())
