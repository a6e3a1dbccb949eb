"""The `elixir` command: `train` runs under every plan knob, and bad flags fail in one line."""

import io
import math
import os
import subprocess
import sys

import pytest

from elixir.cli import build_parser, main
from elixir.cli.train import lr_factor, train

# A job small enough for a unit test: ~36k parameters, a few steps of a few short sequences, planned for
# the CPU preset (measuring this machine takes seconds, and a busy one is measured again every run).
TINY = [
    "train", "--model", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
    "--hardware", "CPU",
]


def args_of(*extra: str):
    return build_parser().parse_args([*TINY, *extra])


def test_main_trains_quietly(capsys):
    assert main([*TINY, "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_train_returns_finite_losses():
    result = train(args_of("--quiet"))
    assert result["steps"] == 3
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["val_loss"])
    # Byte-level predictions start near uniform: ln(256) ~ 5.5.
    assert 0 < result["train_loss"] < 6.5
    assert result["tokens_per_s"] > 0


@pytest.mark.parametrize(
    "flags",
    [
        ["--on-demand", "--cache-blocks", "2", "--chunk-mib", "0.05"],
        ["--on-demand", "--param-home", "host", "--optim-home", "host", "--chunk-mib", "0.05"],
        ["--optim-home", "host", "--grad-accum", "2"],
        ["--on-demand", "--chunk-mib", "0.05", "--checkpointing", "--prefetch-depth", "0"],
        ["--dtype", "bf16"],
        ["--dtype", "fp16", "--resident"],  # the CPU preset has no fp16 rate to plan with: a hand plan
    ],
    ids=["on-demand", "host-homes", "optim-host-accum", "checkpointing", "bf16", "fp16"],
)
def test_plan_and_dtype_flags_train(flags):
    result = train(args_of("--quiet", *flags))
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["val_loss"])


def test_same_seed_same_losses():
    # fp32 on one process is deterministic: the plan must not change the numbers much either.
    a = train(args_of("--quiet"))
    b = train(args_of("--quiet", "--on-demand", "--chunk-mib", "0.05"))
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_output_lines_when_not_a_terminal():
    out = io.StringIO()
    train(args_of("--log-every", "1", "--eval-every", "2"), out=out)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["chunks", "params"]  # the plan summary first
    assert any("35,712 parameters" in line for line in lines)
    steps = [line for line in lines if line.startswith("step ") and "tok/s" in line]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"]
    assert all("device" in s and "host" in s and "MiB" in s for s in steps)
    assert sum("val loss" in line for line in lines if line.startswith("step ")) == 2  # steps 2 and 3
    assert lines[-1].startswith("done: train loss")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_in_place_on_a_terminal():
    out = FakeTTY()
    train(args_of("--eval-every", "0"), out=out)
    text = out.getvalue()
    assert "\r[" in text and "3/3" in text
    assert text.endswith("\n") and text.splitlines()[-1].startswith("done: train loss")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--dtype", "fp8"], "'fp8'"),
        (["--steps", "0"], "--steps"),
        (["--steps", "ten"], "'ten'"),
        (["--param-home", "gpu"], "'gpu'"),
        (["--optim-home", "nvme"], "'nvme'"),
        (["--optim-home", "disk"], "--disk DIR"),  # the disk tier needs its scratch folder
        (["--lr", "-1"], "--lr"),
        (["--model", "huge"], "'huge'"),
        (["--seq-len", "100"], "--seq-len 100"),  # tiny's block size is 64
        (["--param-home", "host"], "--on-demand"),  # host shards need on-demand chunks
        (["--chunk-mib", "0.001"], "chunk_mib"),  # smaller than the largest parameter
        (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    ],
)
def test_bad_values_exit_with_one_line_naming_them(flags, named, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *flags])  # a flag given twice (--seq-len): the last wins, as in argparse
    assert exc.value.code == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert message.startswith("elixir train: error:")
    assert named in message


def test_data_too_short_for_seq_len(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("hello world\n" * 20)  # 240 bytes: 12 of them held out for validation
    with pytest.raises(SystemExit):
        main([*TINY, "--data", str(text)])
    assert "--seq-len" in capsys.readouterr().err


def test_trains_on_a_folder_of_text(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    (tmp_path / "b.md").write_text("# notes\n" * 100)
    result = train(args_of("--quiet", "--data", str(tmp_path)))
    assert math.isfinite(result["train_loss"])


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code == 2
    assert "'fly'" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    steps = 200
    factors = [lr_factor(s, steps) for s in range(steps)]
    assert factors[0] == pytest.approx(1 / 20)
    assert max(factors) == pytest.approx(1.0)
    assert factors[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[19:], factors[20:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.dist
def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "elixir", "train", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model", "--steps", "--on-demand", "--param-home", "--optim-home", "--grad-accum"):
        assert flag in proc.stdout


@pytest.mark.dist
@pytest.mark.parametrize("joined", [False, True])
def test_the_command_leaves_with_the_run_s_status_and_runs_the_exit_handlers(joined):
    """[Note: leaving a process that had a process group] (elixir/cli): a process that joined a group leaves
    through os._exit, after Python's exit handlers and with the run's own status; any other as usual."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = ("import atexit, elixir.cli as cli, elixir.comm as comm\n"
            f"comm.joined_group = {joined}\n"
            "atexit.register(lambda: print('handler ran', flush=True))\n"
            "cli.main = lambda: 3\n"
            "print('run over', flush=True)\n"
            "cli.console()\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == ["run", "over", "handler", "ran"]


def test_a_step_far_from_its_prediction_is_warned_about(tmp_path, capsys):
    """Rates a thousand times this machine's: the step takes far longer than predicted, and elixir train says
    so after warm-up, naming the way to measure the machine again."""
    import dataclasses

    from elixir.hardware import Hardware

    hw = Hardware.preset("CPU")
    fast = dataclasses.replace(
        hw, matmul_flops={k: v * 1000 for k, v in hw.matmul_flops.items()},
        attention_flops={k: v * 1000 for k, v in hw.attention_flops.items()},
        h2d_bytes_per_s=hw.h2d_bytes_per_s * 1000, d2h_bytes_per_s=hw.d2h_bytes_per_s * 1000,
        device_copy_bytes_per_s=hw.device_copy_bytes_per_s * 1000,
        device_optim_elems_per_s=hw.device_optim_elems_per_s * 1000,
        host_optim_elems_per_s=hw.host_optim_elems_per_s * 1000,
    )
    path = tmp_path / "fast.json"
    path.write_text(fast.to_json())
    argv = [a for a in TINY if a not in ("CPU", "--hardware")]
    assert main([*argv, "--hardware", str(path), "--steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "x the predicted one" in out and "elixir plan --calibrate" in out
