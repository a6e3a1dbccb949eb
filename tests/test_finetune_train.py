"""`elixir train` fine-tuning a Hugging Face model on chats: metrics, checkpoints kept, export that loads
with AutoModelForCausalLM + AutoTokenizer and generates; config files and a resume that needs no flag;
exact resume mid-epoch on 1 and 2 ranks; plan files and memory caps."""

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from finetune_helpers import chat_rows, make_llama, make_tokenizer, write_jsonl

from elixir.cli import main, parse_args
from elixir.cli.train import train


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A tiny Llama with its tokenizer, and 64 chats (about 35 batches of 2 x 64 tokens an epoch)."""
    root = tmp_path_factory.mktemp("job")
    make_tokenizer(str(root / "tok"))
    make_llama(str(root / "llama"), 400, tokenizer_from=str(root / "tok"))
    write_jsonl(root / "chat.jsonl", chat_rows(64))
    return root


def flags_of(root, *extra):
    return ["train", "--model", str(root / "llama"), "--data", str(root / "chat.jsonl"), "--cache-dir",
            str(root / "cache"), "--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--eval-every", "0",
            "--hardware", "CPU", *extra]


def test_fine_tune_chats_metrics_checkpoints_export_and_generate(job_dir, tmp_path):
    import transformers

    out = io.StringIO()
    run = tmp_path / "run"
    args = parse_args(flags_of(job_dir, "--steps", "4", "--log-every", "1", "--save-every", "1", "--keep-last", "2",
                               "--out", str(run), "--report-to", "tensorboard", "--lr", "1e-3"))
    result = train(args, out=out)
    text = out.getvalue()
    assert args.dtype == "fp32" and args.lr == 1e-3 and args.weight_decay == 0.0 and args.beta2 == 0.999
    assert "predicted step" in text and "measured" in text and "documents" in text
    assert "(median of 3)" in text  # steps 2-4, after one warm-up step
    assert math.isfinite(result["train_loss"]) and result["step_s"] > 0 and result["predicted_step_s"] > 0

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["grad_norm"] > 0
        assert r["tokens_per_step"] == 2 * 64
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] * r["window_steps"] / r["window_s"])
        assert r["tflops"] == pytest.approx(r["flops_per_step"] * r["window_steps"] / r["window_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / r["peak_flops"])
        assert r["flops_per_step"] > 0 and r["host_rss_bytes"] > 0
        assert 0 <= r["chunk_wait_s"] <= r["step_s"]
        assert 0 < r["device_bytes"] <= r["device_bytes_peak"]
    assert steps[0]["lr"] < steps[-1]["lr"] or steps[0]["lr"] == pytest.approx(1e-3)  # warmup: 1 step here
    assert any("val_loss" in r for r in records)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))

    assert sorted(n for n in os.listdir(run) if n.startswith("step-")) == ["step-0000003", "step-0000004"]
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model"] == str(job_dir / "llama") and saved["keep_last"] == 2

    assert main(["export", str(run / "step-0000004"), "--out", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert os.path.isfile(tmp_path / "hf" / "generation_config.json")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a loop."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(generated[0]), str)


CONFIG_YAML = """
# keys are the long flags, with - or _
seq-len: 64
batch_size: 2
schedule: constant
warmup_steps: 0
lr: 1e-3
eval_every: 0
eval-batches: 1
hardware: CPU
steps: 100
"""


@pytest.mark.slow
def test_config_file_round_trip_and_a_resume_that_needs_no_flags(job_dir, tmp_path):
    (tmp_path / "job.yaml").write_text(CONFIG_YAML)
    (tmp_path / "job.toml").write_text(
        'seq_len = 64\nbatch-size = 2\nschedule = "constant"\nwarmup_steps = 0\nlr = 1e-3\neval_every = 0\n'
        'eval-batches = 1\nhardware = "CPU"\nsteps = 100\n'
    )
    base = ["train", "--model", str(job_dir / "llama"), "--data", str(job_dir / "chat.jsonl"), "--cache-dir",
            str(job_dir / "cache"), "--quiet"]
    from_yaml = parse_args([*base, "--config", str(tmp_path / "job.yaml"), "--steps", "6"])
    from_toml = parse_args([*base, "--config", str(tmp_path / "job.toml"), "--steps", "6"])
    assert from_yaml.steps == 6  # the command line wins over the file
    assert (from_yaml.seq_len, from_yaml.batch_size, from_yaml.lr, from_yaml.schedule) == (64, 2, 1e-3, "constant")
    def flags(args):
        return {k: v for k, v in vars(args).items() if k != "config" and not k.startswith("_")}

    assert flags(from_yaml) == flags(from_toml)

    whole = train(parse_args([*base, "--config", str(tmp_path / "job.yaml"), "--steps", "6"]))
    first = parse_args([*base, "--config", str(tmp_path / "job.yaml"), "--steps", "3", "--out", str(tmp_path / "a")])
    train(first)
    # the resolved config in --out reproduces the run's flags
    again = parse_args(["train", "--config", str(tmp_path / "a" / "train_config.json")])
    assert {k: getattr(again, k) for k in ("model", "data", "seq_len", "lr", "steps", "warmup_steps", "dtype")} == {
        k: getattr(first, k) for k in ("model", "data", "seq_len", "lr", "steps", "warmup_steps", "dtype")}
    # mid-epoch (35 batches an epoch), with nothing but the checkpoint and the new total
    resumed = parse_args(["train", "--resume", str(tmp_path / "a"), "--steps", "6"])
    assert resumed.model == str(job_dir / "llama") and resumed.seq_len == 64 and resumed.quiet
    result = train(resumed)
    assert result["train_loss"] == whole["train_loss"]
    assert result["val_loss"] == whole["val_loss"]


def _env():
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.dist
def test_resume_mid_epoch_on_two_ranks_is_exact_and_one_rank_continues_it(job_dir, tmp_path):
    import dataclasses

    from elixir.hardware import Hardware

    # the CPU preset with a collective rate for 2 ranks, which a preset has no figure for
    hardware = dataclasses.replace(Hardware.preset("CPU"), collective_bytes_per_s={2: 1e9})
    (tmp_path / "hw.json").write_text(hardware.to_json())
    common = [*flags_of(job_dir, "--schedule", "constant", "--warmup-steps", "0", "--lr", "1e-3", "--quiet"),
              "--hardware", str(tmp_path / "hw.json")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "elixir"]

    def launch(*flags):
        done = subprocess.run([*torchrun, *common, *flags], env=_env(), timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    # the uninterrupted run keeps its step-2 checkpoint, from which the second run resumes
    launch("--steps", "4", "--out", str(tmp_path / "run"), "--save-every", "2", "--keep-last", "2", "--json",
           str(tmp_path / "whole.json"))
    launch("--resume", str(tmp_path / "run" / "step-0000002"), "--out", str(tmp_path / "again"), "--json",
           str(tmp_path / "resumed.json"))
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["train_loss"] == whole["train_loss"] and resumed["val_loss"] == whole["val_loss"]
    # one rank goes on from the same checkpoint with the same batches: the loss is normalized by the tokens
    # trained over all ranks, so only the reduction's rounding differs
    one = train(parse_args(["train", "--resume", str(tmp_path / "run" / "step-0000002"), "--out",
                            str(tmp_path / "one")]))
    assert one["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert one["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-4)


def test_a_plan_file_sets_the_batch_and_memory_caps_reach_the_planner(tmp_path, capsys):
    import dataclasses

    import elixir
    from elixir.hardware import Hardware
    from elixir.models import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny"))
    batch = {"input_ids": torch.zeros(1, 32, dtype=torch.long), "labels": torch.zeros(1, 32, dtype=torch.long)}
    plan = elixir.plan(model, batch, hardware=Hardware.preset("CPU"), tokens_per_step=4 * 32)
    plan = dataclasses.replace(plan, micro_batch_size=2, grad_accum=2)  # what a search for 4 x 32 could choose
    (tmp_path / "plan.json").write_text(plan.to_json())
    out = io.StringIO()
    args = parse_args(["train", "--model", "tiny", "--steps", "2", "--seq-len", "32", "--eval-batches", "1",
                       "--hardware", "CPU", "--plan", str(tmp_path / "plan.json"), "--log-every", "1"])
    train(args, out=out)
    assert (args.batch_size, args.grad_accum) == (2, 2)
    assert "2 steps of 2 x 32 tokens x 2 micro-batches" in out.getvalue()

    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "tiny", "--steps", "1", "--seq-len", "32", "--hardware", "CPU", "--gpu-memory",
              "64KiB", "--host-memory", "64KiB"])
    assert e.value.code == 2
    assert "elixir train: error:" in capsys.readouterr().err
