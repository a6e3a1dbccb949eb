"""`elixir bench` and the GPU benchmark's dry run: they complete, report every system, and reject bad flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elixir.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--reps", "1", "--steps", "1", "--warmup", "1"]


def _env(**extra):
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.dist
def test_bench_one_process_writes_rows_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "elixir", "bench", "--nproc", "1", *TINY,
                           "--systems", "pytorch,elixir,fsdp2", "--json", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| setting | system | tokens/s | TFLOPS/rank |" in done.stdout
    assert "rep 1/1: elixir" in done.stdout  # the progress line
    assert "predicted step" in done.stdout
    data = json.loads(out.read_text())
    rows = {r["system"]: r for r in data["rows"]}
    assert set(rows) == {"pytorch", "elixir", "fsdp2"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["tflops_per_rank"] > 0
        assert r["memory"]["ram"]["source"] == "RSS" and r["memory"]["ram"]["peak_bytes"] >= 0
        assert r["speed_vs_elixir"]["vs"] == "elixir"
        assert r["loss_rel_diff_first_steps"] <= 1e-4  # fp32, the same math
    assert rows["elixir"]["speed_vs_elixir"]["median"] == 1.0
    assert rows["elixir"]["predicted_step_s"] > 0 and rows["elixir"]["elixir_counters"]["device_bytes_peak"] > 0
    assert set(data["ratios"]) == {"pytorch/elixir", "fsdp2/elixir"}
    assert data["ratios"]["fsdp2/elixir"]["median"] > 0
    assert data["config"]["world_size"] == 1 and data["skipped"] == {}


@pytest.mark.dist
def test_bench_relaunches_itself_on_two_ranks(tmp_path):
    out = tmp_path / "bench2.json"
    done = subprocess.run([sys.executable, "-m", "elixir", "bench", "--nproc", "2", *TINY, "--batch-size", "4",
                           "--systems", "elixir,fsdp2-offload", "--json", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node=2" in done.stdout
    assert done.stdout.count("| setting | system |") == 1  # rank 0 only
    data = json.loads(out.read_text())
    assert data["config"]["world_size"] == 2
    assert {r["system"] for r in data["rows"]} == {"elixir", "fsdp2-offload"}
    assert "fsdp2-offload/elixir" in data["ratios"]


@pytest.mark.slow
def test_deepspeed_missing_is_reported_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    from elixir import bench

    monkeypatch.setattr(bench, "deepspeed_available", lambda: False)  # where `elixir bench` looks it up
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, "--systems", "elixir,deepspeed", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DeepSpeed not installed: pip install 'elixir-train[bench]'" in text
    assert "| deepspeed | not run: DeepSpeed not installed |" in text
    data = json.loads(out.read_text())
    assert [r["system"] for r in data["rows"]] == ["elixir"] and "deepspeed" in data["skipped"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown model 'gpt5'"),
    (["--systems", "elixir,zero"], "unknown zero"),
    (["--nproc", "0"], "0 is too small"),
    (["--reps", "x"], "'x' is not an integer"),
    (["--nproc", "2", "--systems", "pytorch,elixir"], "pytorch runs in one process only"),
    (["--nproc", "2", "--batch-size", "3"], "does not divide over 2 ranks"),
    (["--model", "tiny", "--seq-len", "100"], "exceeds the 64 positions"),
    (["--model", "opt-125m", "--n-layer", "2"], "override the GPT presets only"),
    (["--json", "/no/such/folder/x.json"], "does not exist"),
])
def test_bad_flags_give_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("elixir bench: error:") and message in last, err
    assert "Traceback" not in err


@pytest.mark.dist
def test_gpu_benchmark_dry_run(tmp_path):
    done = subprocess.run(["bash", "bench/gpu/run.sh", "--dry-run"], cwd=REPO, env=_env(OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    text = done.stdout
    assert "Elixir GPU benchmark summary" in text and "DRY RUN" in text
    assert "| stage | measure | result |" in text
    # the curve's 8k-128k tokens per step are 1-16 sequences of 16 tokens in the dry run
    curve = [f"| c curve {t} tokens/step |" for t in (16, 32, 64, 128, 256)]
    for row in ("| 0 parity fp32 |", "| 0 parity bf16 |", "| 0b checkpoint |", "| b opt-2.7b bf16 8x16", "| plans |",
                "| d fidelity |", "| e host AdamW |", *curve):
        assert row in text, row
    for bad in ("MISMATCH", "DIFFER", "missing", "not run", "not measured", "Traceback"):
        assert bad not in text, bad
    figures = json.loads((tmp_path / "summary.json").read_text())["figures"]
    assert {"b_elixir_over_pytorch", "b_elixir_over_fsdp2_offload", "b_elixir_step_measured_over_predicted",
            "b_elixir_host_bytes_per_param", *(f"c_{t}_tflops" for t in (16, 32, 64, 128, 256))} <= set(figures)
    for stage in ("hardware", "parity", "checkpoint", "plans", "curve", "fidelity", "host-adamw"):
        assert (tmp_path / f"{stage}.json").exists(), stage
    # the host AdamW stage: each condition a CPU has (no copies without a GPU), with all threads and one fewer
    host = json.loads((tmp_path / "host-adamw.json").read_text())
    assert [(r["condition"], r["threads"]) for r in host["rows"]] == [
        (c, t) for t in dict.fromkeys((host["threads"], max(1, host["threads"] - 1)))
        for c in ("alone", "pinned", "launching thread")]
    assert all(r["elems_per_s"] > 0 for r in host["rows"])
    # the fidelity stage: every model under every plan (the searched one where a plan fits), memory exact
    fidelity = json.loads((tmp_path / "fidelity.json").read_text())
    assert fidelity["skipped"] == {} and {"d_median_error", "d_worst_error"} <= set(figures)
    assert {r["model"] for r in fidelity["rows"]} == {"llama", "neox", "opt", "qwen2", "mixtral"}
    for r in fidelity["rows"]:
        assert r["predicted_device_bytes"] == r["measured_device_bytes"] > 0, r
        assert r["predicted_s"] > 0 and len(r["step_s"]) == fidelity["config"]["reps"], r
    rows = {s: json.loads((tmp_path / f"offload-{s}.json").read_text()) for s in ("pytorch", "fsdp2-offload", "elixir")}
    # every retry ran: PyTorch's smaller micro-batch, Elixir's plan for less memory, FSDP2 with checkpointing
    for s, stage in rows.items():
        assert [a["error"] for a in stage["attempts"]] == [None, None], (s, stage["attempts"])
    first = {s: stage["rows"][0] for s, stage in rows.items()}
    # one model, one batch, one global step in every system: the first loss and grad norm agree (bf16)
    for key in ("losses", "grad_norms"):
        values = [r[key][0] for r in first.values()]
        assert max(values) - min(values) <= 1e-2 * abs(values[0]), (key, values)
    ex = first["elixir"]
    assert ex["predicted_step_s"] > 0 and ex["timed_step_stats"]["steps"] == ex["reps"] == 3
    assert 0 <= ex["timed_step_stats"]["rollbacks"] <= ex["reps"]
    assert set(ex["per_step_counters"]) == {"elixir.allocations", "elixir.pinned_allocations"}
    assert ex["per_step_counters"]["elixir.pinned_allocations"] == 0  # nothing is pinned on the CPU


@pytest.mark.dist
def test_recorded_gpu_measurements_are_predicted_again_for_the_plans_that_ran(tmp_path):
    """bench/gpu/repredict.py rebuilds a recorded H200 run's plans on this CPU: with the recorded rates it predicts
    what the run logged (the same plans, searched for the same figures), and a rate changed with --scale moves
    only the plans that use it (the host's AdamW: the plans with the optimizer on the host)."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "bench/gpu/repredict.py", "bench/gpu/recorded/h200-2026-12-04-call3",
                           "--models", "opt", "--scale", "host_optim_elems_per_s=0.5", "--json", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    rows = {r["plan"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"resident", "ondemand", "host", "searched"}
    for r in rows.values():
        assert r["recorded_s"] == pytest.approx(r["logged_s"], rel=0.02), r
    for plan in ("resident", "ondemand"):
        assert rows[plan]["changed_s"] == rows[plan]["recorded_s"], plan
    for plan in ("host", "searched"):  # half the rate: the worker's updates take longer than backward hides
        assert rows[plan]["changed_s"] > 1.1 * rows[plan]["recorded_s"], plan
    assert "changed  : median error" in done.stdout


@pytest.mark.dist
def test_importing_the_benchmark_harness_changes_no_warning_filter():
    script = ("import warnings, torch, elixir; before = list(warnings.filters); import elixir.bench; "
              "print([f for f in warnings.filters if f not in before])")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr[-2000:])
