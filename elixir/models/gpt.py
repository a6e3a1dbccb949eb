"""A reference GPT in one file: the model elixir trains by default and tests against.

A plain `nn.Module` with no distributed code: elixir's runtime manages its parameters from the
outside. Two of its habits are deliberate, because real models have them and the runtime must
handle them:
- with `tie_embeddings` the output layer reuses `wte.weight` in `GPT.forward`, i.e. a parameter
  used outside its own module's `forward`;
- with `gradient_checkpointing_enable()` every block recomputes its forward during backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from elixir.parallel.moe import Experts, MoE, Router

# Each preset is a set of GPTConfig fields; `GPTConfig.preset(name)` fills in the rest with defaults.
_PRESETS: dict[str, dict[str, int]] = {
    # ~36k parameters: unit tests.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    # ~3.3M parameters: the default `elixir train` job on the embedded corpus.
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    # ~50M parameters, byte-level: benchmarks that should not fit trivially.
    "50m": dict(n_layer=10, n_head=10, n_embd=640, block_size=256),
    # GPT-2 small (124M), with its BPE vocabulary size.
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


@dataclass(kw_only=True)
class GPTConfig:
    """Sizes of a GPT. The defaults are the "small" preset on byte tokens."""

    vocab_size: int = 256
    """Number of token ids; 256 for the byte-level tokens of `elixir.data`."""
    block_size: int = 256
    """Longest sequence the model accepts (the number of learned positions)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide `n_embd`."""
    n_embd: int = 256
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches."""
    bias: bool = True
    """Whether the Linear and LayerNorm layers have biases (as GPT-2 does)."""
    tie_embeddings: bool = True
    """Whether the output layer reuses the token embedding `wte.weight` (no `lm_head` module)."""
    n_experts: int = 0
    """Experts of the Mixture-of-Experts feed-forward layer of every block; 0: the dense MLP. Expert
    parallelism is applied from outside (`elixir.parallel.expert_parallel`); see elixir/parallel/moe.py."""
    top_k: int = 2
    """Experts each token is routed to (1 or 2 usually; at most n_experts). Used when n_experts > 0."""
    expert_hidden: int = 0
    """Hidden width F of each SwiGLU expert; 0: 4 * n_embd."""
    moe_aux_weight: float = 0.01
    """Weight of the load-balancing loss (summed over the blocks) added to the language-model loss."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r}: must be a positive int")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick an n_head that divides n_embd (e.g. {_nearest_divisor(self.n_embd, self.n_head)})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ValueError(f"GPTConfig.n_experts={self.n_experts!r}: must be 0 (dense) or a positive int")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"GPTConfig.top_k={self.top_k!r}: each token goes to top_k of the n_experts={self.n_experts} "
                "experts; use 1 <= top_k <= n_experts"
            )
        if self.expert_hidden < 0:
            raise ValueError(f"GPTConfig.expert_hidden={self.expert_hidden!r}: must be 0 (4 * n_embd) or positive")

    @property
    def expert_width(self) -> int:
        """Hidden width of each expert."""
        return self.expert_hidden or 4 * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """The config of a named size ("tiny", "small", "50m", "gpt2"), with fields overridden."""
        if name not in _PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; known presets: {', '.join(_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown GPTConfig fields {unknown}; the fields are: {', '.join(sorted(known))}"
            )
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(_PRESETS)

    def num_params(self) -> int:
        """Number of distinct parameters of `GPT(self)`, computed without building it."""
        C, V, b = self.n_embd, self.vocab_size, int(self.bias)
        layer_norm = C + b * C
        attn = (C * 3 * C + b * 3 * C) + (C * C + b * C)  # c_attn, c_proj
        mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)  # c_fc, c_proj
        if self.n_experts:
            mlp = self.n_experts * C + self.n_experts * 3 * self.expert_width * C  # router, experts
        block = 2 * layer_norm + attn + mlp
        embeddings = V * C + self.block_size * C  # wte, wpe
        lm_head = 0 if self.tie_embeddings else V * C
        return embeddings + self.n_layer * block + layer_norm + lm_head


def _nearest_divisor(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


@dataclass
class GPTOutput:
    """What `GPT.forward` returns; `.loss` and `.logits` as in Hugging Face models."""

    loss: Tensor | None
    """Mean next-token cross entropy over labelled positions; None without labels."""
    logits: Tensor
    """(B, T, vocab_size) scores of the next token at every position."""
    aux_loss: Tensor | None = None
    """Mixture-of-Experts models: the load-balancing loss summed over blocks (already in `loss`, weighted
    by `moe_aux_weight`); None for dense models."""


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        if config.n_experts:
            self.mlp = MoE(config.n_embd, config.expert_width, config.n_experts, config.top_k)
        else:
            self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """GPT-2-style decoder; `forward(input_ids, labels)` returns a `GPTOutput` like HF models."""

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GPTConfig()
        cfg = self.config
        # Registration order is the order of use in forward: the runtime packs chunks that way.
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        # Tied: the logits use wte.weight directly in forward, so there is no lm_head module.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialization from the global torch RNG: normal(0, 0.02) weights, zero biases,
        unit LayerNorms, residual projections (`c_proj`) scaled by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, Experts):  # down_proj is a residual projection, as c_proj
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=0.02)
                nn.init.normal_(module.down_proj, mean=0.0, std=residual_std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of distinct parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's forward in backward instead of keeping its activations.

        Takes effect in training mode with grad enabled. The argument exists for Hugging Face
        compatibility and is ignored: checkpointing always uses `use_reentrant=False`."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(
        self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> GPTOutput:
        """input_ids (B, T) token ids. labels (B, T) or None: the same ids as input_ids (the model
        shifts them: logits at t predict labels at t + 1), -100 where no loss is wanted.
        attention_mask is accepted and ignored, so that Hugging Face style batches work: the
        model always attends causally and batches are unpadded."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; "
                f"use sequences of at most {self.config.block_size} tokens or a config with block_size >= {T}"
            )
        pos = torch.arange(T, dtype=torch.long, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if use_checkpoint:
                x = checkpoint(block, x, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        if self.lm_head is None:
            logits = F.linear(x, self.wte.weight)  # (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} differs from input_ids shape "
                    f"{tuple(input_ids.shape)}; "
                    "pass labels aligned with input_ids (the model shifts them itself)"
                )
            # fp32 loss even when the model computes in bf16/fp16, as HF models do.
            shift_logits = logits[:, :-1].float()  # (B, T-1, V)
            shift_labels = labels[:, 1:]  # (B, T-1)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
            )
        aux_loss = None
        if self.config.n_experts:
            aux_loss = sum(block.mlp.pop_aux_loss() for block in self.h)  # load balancing, summed over blocks
            if loss is not None:
                loss = loss + self.config.moe_aux_weight * aux_loss
        return GPTOutput(loss=loss, logits=logits, aux_loss=aux_loss)
