"""Pretrained Hugging Face MoE weights into expert-parallel models built on meta, and back out.

transformers writes MoE checkpoints with one tensor per expert (see [Note: legacy expert names] in
elixir/checkpoint/weights.py); load_pretrained reads them into the stacked expert tensors, each rank
only its own experts' rows.
"""

import copy

import pytest
import torch
from dist import run_ranks
from test_moe import tiny_mixtral, tiny_olmoe

import elixir
from helpers import batches, make_plan

BUILDERS = {"mixtral": tiny_mixtral, "olmoe": tiny_olmoe}


def _load(model_name, path, ep, kind):
    ref = BUILDERS[model_name]()
    with torch.device("meta"):
        model = type(ref)(copy.deepcopy(ref.config))
    if ep > 1:
        elixir.parallel.expert_parallel(model, ep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = elixir.wrap(model, opt, plan=make_plan(model, kind, opt))
    report = elixir.load_pretrained(model, path)
    assert report == {"missing": [], "unexpected": []}, report
    return model


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=batches(1, batch=4)[0]).logits


@pytest.fixture(params=["mixtral", "olmoe"])
def saved(request, tmp_path):
    ref = BUILDERS[request.param]().eval()
    ref.save_pretrained(tmp_path / "hf")
    return request.param, str(tmp_path / "hf"), _logits(ref)


def test_per_expert_checkpoints_load_on_one_process(saved):
    name, path, want = saved
    torch.testing.assert_close(_logits(_load(name, path, 1, "resident")), want, rtol=0, atol=0)


def _expert_parallel(rank, world, name, path, want, out):
    model = _load(name, path, world, "host")
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    elixir.export(model, out)


@pytest.mark.dist
def test_per_expert_checkpoints_load_into_expert_parallel_ranks(saved, tmp_path):
    import transformers

    name, path, want = saved
    run_ranks(_expert_parallel, 2, name, path, want, str(tmp_path / "export"))
    # the export holds every expert, and transformers reads it (here, outside the process group:
    # from_pretrained looks at torch.distributed when it is initialised)
    back = getattr(transformers, type(BUILDERS[name]()).__name__).from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(_logits(back), want, rtol=0, atol=0)


@pytest.mark.dist
def test_train_fine_tunes_a_hugging_face_moe_folder_with_expert_parallelism(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
    )
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    args = ["train", "--model", str(tmp_path / "hf"), "--steps", "3", "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "0", "--eval-batches", "1", "--quiet", "--lr", "1e-4", "--byte-tokens"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    subprocess.run([sys.executable, "-m", "elixir", *args, "--json", str(one)], check=True, env=env, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run([*torchrun, "-m", "elixir", *args, "--ep-size", "2", "--json", str(many)], env=env,
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(many.read_text())
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
