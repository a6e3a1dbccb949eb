"""The reference GPT: shapes, loss, tying, checkpointing, init, presets and config errors."""

import copy

import pytest
import torch

from elixir.models import GPT, GPTConfig, GPTOutput


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.preset("tiny", **overrides)


def batch(config: GPTConfig, B: int = 2, T: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (B, T), generator=g)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    config = tiny()
    model = GPT(config)
    ids = batch(config)
    out = model(ids)
    assert isinstance(out, GPTOutput)
    assert out.loss is None
    assert out.logits.shape == (2, 16, config.vocab_size)
    out = model(ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert out.loss.shape == ()
    # At init the predictions are near uniform over the byte vocabulary.
    assert abs(out.loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_loss_is_shifted_mean_with_ignore_index():
    torch.manual_seed(0)
    model = GPT(tiny())
    ids = batch(model.config, T=8)
    labels = ids.clone()
    labels[:, 5:] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, 256), ids[:, 1:5].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_loss_decreases_with_adamw():
    torch.manual_seed(0)
    model = GPT(tiny())
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = batch(model.config, B=4, T=32)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_tied_and_untied_parameter_counts():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    tied_model, untied_model = GPT(tied), GPT(untied)
    assert not hasattr(tied_model, "lm_head") or tied_model.lm_head is None
    assert isinstance(untied_model.lm_head, torch.nn.Linear)
    extra = untied.vocab_size * untied.n_embd
    assert untied_model.num_params() - tied_model.num_params() == extra
    for config, model in ((tied, tied_model), (untied, untied_model)):
        assert config.num_params() == model.num_params()
    assert "lm_head.weight" not in tied_model.state_dict()


def test_tied_weight_is_shared():
    torch.manual_seed(0)
    model = GPT(tiny())
    ids = batch(model.config)
    with torch.no_grad():
        model.wte.weight[3].zero_()
    logits = model(ids).logits
    assert torch.all(logits[..., 3] == 0)
    # The output layer's gradient lands in wte.weight: a token never in the input still gets one.
    model(ids, labels=ids).loss.backward()
    absent = sorted(set(range(256)) - set(ids.flatten().tolist()))[0]
    assert model.wte.weight.grad[absent].abs().sum() > 0


def test_module_order_is_use_order():
    model = GPT(tiny(tie_embeddings=False))
    names = [name for name, _ in model.named_children()]
    assert names == ["wte", "wpe", "drop", "h", "ln_f", "lm_head"]
    params = [name for name, _ in model.named_parameters()]
    assert params[:2] == ["wte.weight", "wpe.weight"] and params[-1] == "lm_head.weight"


@pytest.mark.parametrize("tie", [True, False])
def test_gradient_checkpointing_gives_identical_grads(tie):
    torch.manual_seed(0)
    plain = GPT(tiny(tie_embeddings=tie, dropout=0.1))
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    ids = batch(plain.config)
    for model in (plain, ckpt):
        # The same dropout masks in both: non-reentrant checkpoint replays the RNG state.
        torch.manual_seed(1)
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_checkpointing_only_in_training(monkeypatch):
    import elixir.models.gpt as gpt

    calls = []
    real = gpt.checkpoint
    monkeypatch.setattr(gpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = GPT(tiny())
    model.gradient_checkpointing_enable()
    ids = batch(model.config)
    model.eval()
    model(ids)
    assert calls == []
    model.train()
    model(ids)
    assert len(calls) == model.config.n_layer
    model.gradient_checkpointing_disable()
    model(ids)
    assert len(calls) == model.config.n_layer


def test_init_is_deterministic_and_gpt2_like():
    torch.manual_seed(123)
    a = GPT(tiny())
    torch.manual_seed(123)
    b = GPT(tiny())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    torch.manual_seed(124)
    c = GPT(tiny())
    assert not torch.equal(a.wte.weight, c.wte.weight)
    big = GPT(tiny(n_embd=128, n_head=4))  # more samples for the std checks
    assert big.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 2.0, rel=0.05)  # 1/sqrt(2*2)
    assert torch.all(big.h[0].attn.c_attn.bias == 0)
    assert torch.all(big.h[0].ln_1.weight == 1)


def test_builds_and_runs_on_meta_device():
    with torch.device("meta"):
        model = GPT(tiny())
        ids = torch.zeros(2, 8, dtype=torch.long)
        out = model(ids, labels=ids)
    assert out.logits.device.type == "meta"
    out.loss.backward()


def test_preset_param_counts():
    counts = {name: GPTConfig.preset(name).num_params() for name in GPTConfig.preset_names()}
    print("preset parameter counts:", counts)
    assert 30_000 <= counts["tiny"] <= 50_000
    assert 2_000_000 <= counts["small"] <= 6_000_000
    assert 40_000_000 <= counts["50m"] <= 60_000_000
    assert counts["gpt2"] == 124_439_808  # GPT-2 small with tied embeddings
    assert GPTConfig.preset("small").block_size == 256
    assert GPTConfig.preset("50m").block_size == 256 and GPTConfig.preset("50m").vocab_size == 256
    assert GPTConfig.preset("small", n_layer=6).n_layer == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
        (dict(n_layer=0), "n_layer=0"),
        (dict(vocab_size=-1), "vocab_size=-1"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_preset_errors():
    with pytest.raises(ValueError, match="tiny, small, 50m, gpt2"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.preset("tiny", n_layers=3)


def test_sequence_longer_than_block_size():
    model = GPT(tiny())
    ids = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="65 exceeds block_size=64"):
        model(ids)
    with pytest.raises(ValueError, match="labels shape"):
        model(ids[:, :8], labels=ids[:, :4])
