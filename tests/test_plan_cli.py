"""`elixir plan`: presets and config files, the table, --json, --plot, and its errors."""

import json

import pytest

import elixir
from elixir.cli import main


@pytest.mark.slow
def test_plan_a_preset_writes_json_and_a_plot(tmp_path, capsys):
    out = tmp_path / "plan.json"
    png = tmp_path / "plan.png"
    status = main(["plan", "--model", "gpt2", "--gpu", "A100-80GB", "--batch-size", "2", "--seq-len", "256",
                   "--json", str(out), "--plot", str(png)])
    assert status == 0
    text = capsys.readouterr().out
    assert "predicted step" in text and "TFLOPS" in text and "peak device" in text
    plan = elixir.Plan.from_json(out.read_text())
    assert plan.predicted["step_s"] > 0 and plan.use_order
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_from_a_config_json(tmp_path, capsys):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=256)
    cfg.save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--gpu", "RTX4090", "--seq-len", "64"]) == 0
    assert "predicted step" in capsys.readouterr().out


@pytest.mark.slow
def test_plan_that_does_not_fit_says_what_would(capsys):
    status = main(["plan", "--model", "gpt2-xl", "--gpu", "A100-80GB", "--gpu-memory", "8GiB",
                   "--host-memory", "4GiB"])
    assert status == 1
    assert "more host memory: at least" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown model 'gpt5'"),
    (["--model", "gpt2", "--gpu", "Z80"], "--gpu 'Z80' is not a preset"),
    (["--model", "gpt2", "--host-memory", "lots"], "lots"),
    (["--model", "gpt2", "--gpu", "H200", "--calibrate"], "--calibrate measures this machine; --gpu H200 plans"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_json_is_loadable_by_wrap_for_the_same_model(tmp_path):
    out = tmp_path / "p.json"
    assert main(["plan", "--model", "gpt2", "--gpu", "A100-80GB", "--seq-len", "128", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["world_size"] == 1 and data["compute_dtype"] == "bfloat16"
