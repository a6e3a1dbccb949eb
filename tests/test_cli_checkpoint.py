"""`elixir train --out/--save-every/--resume`, `elixir train --model HF_FOLDER` and `elixir export`."""

import shutil

import pytest
import torch

import elixir.cli.train as train_cli
from elixir.cli import build_parser, main

JOB = [
    "train", "--model", "tiny", "--steps", "8", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
    "--eval-batches", "1", "--quiet", "--on-demand", "--chunk-mib", "0.05", "--cache-blocks", "2", "--hardware", "CPU",
]


def run(*flags):
    return train_cli.train(build_parser().parse_args([*JOB, *flags]))


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = run()
    real_save = train_cli.save_checkpoint

    def save_and_keep(job, args):  # keep the step-4 checkpoint, as if the run had died after it
        real_save(job, args)
        if job.optim.steps == 4:
            shutil.copytree(tmp_path / "run" / "last", tmp_path / "at4")

    monkeypatch.setattr(train_cli, "save_checkpoint", save_and_keep)
    run("--out", str(tmp_path / "run"), "--save-every", "4")
    monkeypatch.undo()
    resumed = run("--resume", str(tmp_path / "at4"))
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["val_loss"] == whole["val_loss"]


def test_export_writes_the_checkpoint_weights(tmp_path):
    from safetensors.torch import load_file

    import elixir
    from elixir.models import GPT, GPTConfig

    run("--out", str(tmp_path / "run"))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "w.safetensors")]) == 0
    got = load_file(tmp_path / "w.safetensors")
    model = GPT(GPTConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters())
    model, opt = elixir.wrap(model, opt)
    elixir.load(model, opt, tmp_path / "run" / "last")
    want = elixir.full_state_dict(model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_fine_tune_a_hugging_face_folder_and_export_it_back(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(cfg)
    original.save_pretrained(tmp_path / "hf")
    flags = ["--model", str(tmp_path / "hf"), "--byte-tokens", "--steps", "1", "--lr", "1e-12", "--out",
             str(tmp_path / "run")]
    result = train_cli.train(build_parser().parse_args([*JOB[:3], *JOB[5:], *flags]))
    assert 0 < result["train_loss"] < 7
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
    # one step at lr 1e-12: the weights are the pretrained ones, so they were loaded, not initialized
    for (n, p), q in zip(original.named_parameters(), back.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--save-every", "2"], "--save-every 2 needs --out"),
        (["--resume", "/nonexistent/run"], "is not a checkpoint"),
        (["--model", "/nonexistent/model"], "neither a preset"),
    ],
)
def test_bad_checkpoint_flags_fail_before_training(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([*JOB, *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_with_other_data_flags_is_refused(tmp_path):
    run("--out", str(tmp_path / "run"), "--steps", "2")
    with pytest.raises(ValueError, match="--batch-size 2"):
        run("--resume", str(tmp_path / "run"), "--batch-size", "4")
