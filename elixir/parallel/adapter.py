"""Put a model's experts under the expert-parallel pattern, whatever model they are in.

`expert_parallel(model, ep_size)` finds every experts module of the shared interface (the reference
GPT's `elixir.parallel.moe.Experts`, and the experts of Hugging Face transformers 5 MoE families: Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, ...; see elixir/parallel/moe.py), keeps only this rank's experts in its
parameters, marks it with an `ExpertParallel` pattern and gives it the expert-parallel forward. The user
does not rewrite the model; the parameters stay the same objects (an optimizer built before still holds
them), with `.data` narrowed to the local experts.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from elixir import comm
from elixir.parallel.moe import routed_experts
from elixir.parallel.patterns import PATTERN_ATTR, ExpertParallel, check_expert_parallel, expert_groups


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module of the shared interface: 3-D `gate_up_proj [E, 2F, H]` and
    `down_proj [E, H, F]` parameters of its own."""
    found = []
    for name, m in model.named_modules():
        gu, dn = m._parameters.get("gate_up_proj"), m._parameters.get("down_proj")
        if gu is not None and dn is not None and gu.dim() == 3 and dn.dim() == 3:
            found.append((name, m))
    return found


def _check_layout(name: str, m: nn.Module) -> None:
    gu, dn = m.gate_up_proj, m.down_proj
    E, two_f, H = gu.shape
    unsupported = [
        flag
        for flag, bad in (
            ("is_transposed", getattr(m, "is_transposed", False)),
            ("has_bias", getattr(m, "has_bias", False)),
            ("has_post_expert_norm", getattr(m, "has_post_expert_norm", False)),
            ("has_gate=False", not getattr(m, "has_gate", True)),
            ("is_concatenated=False", not getattr(m, "is_concatenated", True)),
        )
        if bad
    ]
    apply_gate = getattr(type(m), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        unsupported.append("a custom _apply_gate")
    if unsupported or dn.shape != (E, H, two_f // 2) or not callable(getattr(m, "act_fn", None)):
        raise ValueError(
            f"experts module {name!r} ({type(m).__name__}) is not of the layout expert parallelism supports "
            f"(gate_up_proj [E, 2F, H], down_proj [E, H, F], act_fn(gate) * up, no biases"
            + (f"; it has {', '.join(unsupported)}" if unsupported else "")
            + "); train it without ep_size (data parallel)"
        )


def _expert_parallel_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    pattern = self.__dict__[PATTERN_ATTR]
    return routed_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.gate_up_proj,
        self.down_proj,
        self.act_fn,
        pattern.num_experts,
        pattern.ep_group,
    )


@torch.no_grad()
def expert_parallel(model: nn.Module, ep_size: int) -> nn.Module:
    """Spread `model`'s experts over expert-parallel groups of `ep_size` ranks; returns the model.

    Call it on every rank, once `torch.distributed` is initialised, before making the plan and before
    `elixir.wrap`. The optimizer may be built before or after: the parameters stay the same objects.
    `ep_size` must divide the number of experts and the world size (ValueError naming both, before
    anything changes). `ep_size=1` changes nothing: every rank holds every expert (data parallel)."""
    found = experts_modules(model)
    if not found:
        raise ValueError(
            "expert_parallel found no experts module in the model (a module with 3-D parameters gate_up_proj "
            "[E, 2F, H] and down_proj [E, H, F]); use a Mixture-of-Experts model, or leave ep_size out"
        )
    world = comm.rank_and_world()[1]
    num_experts = found[0][1].gate_up_proj.shape[0]
    for name, m in found:
        if m.gate_up_proj.shape[0] != num_experts:
            raise ValueError(
                f"experts module {name!r} has {m.gate_up_proj.shape[0]} experts but {found[0][0]!r} has "
                f"{num_experts}; expert parallelism needs the same number in every layer"
            )
        if PATTERN_ATTR in m.__dict__:
            raise ValueError(f"experts module {name!r} is already expert-parallel; call expert_parallel once")
        _check_layout(name, m)
    check_expert_parallel(num_experts, ep_size, world)
    if ep_size == 1:
        return model
    ep_group, edp_group = expert_groups(ep_size)
    pattern = ExpertParallel(num_experts, ep_group, edp_group, world)
    local = pattern.local_experts
    for _, m in found:
        for p in (m.gate_up_proj, m.down_proj):
            p.data = p.data[local.start : local.stop].clone()
        m.__dict__[PATTERN_ATTR] = pattern
        m.forward = types.MethodType(_expert_parallel_forward, m)
    return model
