"""Shared builders for runtime tests: tiny models, plans of every kind, a training loop."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import subprocess

import torch

import elixir
from elixir.models import GPT, GPTConfig

VOCAB = 64


def tiny_gpt(tie: bool = True) -> torch.nn.Module:
    return GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, tie_embeddings=tie))


def tiny_hf(family: str) -> torch.nn.Module:
    import transformers as tf

    if family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return tf.GPT2LMHeadModel(cfg)
    if family == "opt":
        cfg = tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
            max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        )
        return tf.OPTForCausalLM(cfg)
    if family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        return tf.LlamaForCausalLM(cfg)
    raise ValueError(family)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tiny_gpt() if family == "gpt" else tiny_hf(family)
    return model.train()


def batches(n: int, batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def small_chunk_mib(model: torch.nn.Module, min_chunks: int = 8, dtype=torch.float32) -> float:
    """A chunk size that holds the largest parameter and still cuts the model into many chunks."""
    sizes = [p.numel() for p in model.parameters()]
    numel = max(max(sizes) + 64, sum(sizes) // (2 * min_chunks))
    return numel * dtype.itemsize / 2**20


def make_plan(model, kind: str, optimizer=None, dtype=torch.float32, cache_blocks: int = 2) -> elixir.Plan:
    """The plans every parity test runs under."""
    mib = small_chunk_mib(model, dtype=dtype)
    if kind == "resident":
        return elixir.Plan.uniform(model, chunk_mib=mib, resident=True, compute_dtype=dtype, optimizer=optimizer)
    if kind == "on_demand":
        return elixir.Plan.uniform(
            model, chunk_mib=mib, cache_blocks=cache_blocks, resident=False, compute_dtype=dtype, optimizer=optimizer
        )
    if kind == "host":
        return elixir.Plan.uniform(
            model, chunk_mib=mib, cache_blocks=cache_blocks, resident=False, param_home="host",
            optim_home="host", compute_dtype=dtype, optimizer=optimizer,
        )
    if kind == "mixed":
        base = elixir.Plan.uniform(
            model, chunk_mib=mib, cache_blocks=cache_blocks, resident=False, compute_dtype=dtype, optimizer=optimizer
        )
        choices = [
            dict(resident=True, param_home="device", optim_home="host"),
            dict(resident=False, param_home="host", optim_home="device"),
            dict(resident=False, param_home="device", optim_home="host"),
            dict(resident=False, param_home="host", optim_home="host"),
        ]
        chunks = [dataclasses.replace(c, **choices[i % 4]) for i, c in enumerate(base.chunks)]
        return dataclasses.replace(base, chunks=tuple(chunks))
    raise ValueError(kind)


PLANS = ("resident", "on_demand", "host", "mixed")


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def train_reference(model, data, steps, lr=1e-2, dtype=torch.float32):
    model = copy.deepcopy(model).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    losses = []
    for i in range(steps):
        loss = loss_of(model, data[i % len(data)])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().float() for n, p in model.named_parameters()}


def train_elixir(model, data, steps, plan_kind, lr=1e-2, dtype=torch.float32, **plan_kw):
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    plan = make_plan(model, plan_kind, opt, dtype=dtype, **plan_kw)
    model, opt = elixir.wrap(model, opt, plan=plan)
    losses = []
    for i in range(steps):
        loss = loss_of(model, data[i % len(data)])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, elixir.full_state_dict(model), model, plan


def assert_close_rel(a, b, rel):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def assert_params_close(got: dict, ref: dict, rel: float):
    assert got.keys() == ref.keys(), set(got) ^ set(ref)
    for n in ref:
        err = ((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item()
        assert err <= rel, f"{n}: relative error {err:.3g} > {rel}"


@contextlib.contextmanager
def mounted_tmpfs(path, options):
    """A small tmpfs mounted at `path` (made here) for a test: a real full or read-only filesystem. Needs
    root: the test is skipped, saying so, where mounting is refused."""
    import pytest

    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
