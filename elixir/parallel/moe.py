"""Mixture-of-Experts: the router, batched experts, and the dropless token dispatch, local or by all-to-all.

The experts follow the interface of Hugging Face transformers 5 (Mixtral, Qwen2-MoE, OLMoE, ...): one module
holding 3-D parameters `gate_up_proj [E, 2F, H]` and `down_proj [E, H, F]`, whose
`forward(hidden_states, top_k_index, top_k_weights)` returns the combined output. So one expert-parallel
forward (`routed_experts` with an expert-parallel group) serves the reference GPT and those models alike.

[Note: dropless routing]
Every token goes to its top-k experts; no capacity, nothing dropped. With a capacity factor the tokens an
expert drops depend on how many tokens the rank that computes it received, so a run on N ranks would drop
other tokens than one process on the global batch, and no parity test could hold. Dropless routing gives
every expert exactly the tokens the router chose, wherever they come from, so expert parallelism changes
where the arithmetic happens and not what it computes. The price is uneven work per rank when routing is
unbalanced, which the load-balancing loss keeps in check; the all-to-all sends variable-sized splits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elixir import comm
from elixir.memory.chunk import ChunkGroup

_all_to_all_log: list[tuple[int, int]] | None = None


@contextlib.contextmanager
def recording_all_to_all() -> Iterator[list[tuple[int, int]]]:
    """While tracing on the meta device: collect the all-to-alls expert-parallel layers would run, as
    (ranks in the group, bytes this rank sends to the others), routing assumed balanced (elixir.profile)."""
    global _all_to_all_log
    outer, _all_to_all_log = _all_to_all_log, []
    try:
        yield _all_to_all_log
    finally:
        _all_to_all_log = outer


def _record_all_to_all(hidden_states: Tensor, top_k: int, ranks: int) -> None:
    if _all_to_all_log is None or ranks == 1:
        return
    # balanced: of the N*k rows sent out (dispatch) and back (combine), 1/P stay on this rank
    sent = hidden_states.shape[0] * top_k * hidden_states.shape[1] * hidden_states.element_size()
    sent = sent * (ranks - 1) // ranks
    # forward: dispatch and combine; their backward runs two more, unless this is a recomputation in
    # backward (activation checkpointing), whose backward was counted by the first forward
    recomputing = torch._C._current_graph_task_id() != -1
    transfers = 2 if recomputing or not hidden_states.requires_grad else 4
    _all_to_all_log.extend([(ranks, sent)] * transfers)


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks by `comm.all_to_all`; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: ChunkGroup) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        comm.all_to_all(out, x, out_splits, in_splits, group, what="all-to-all of expert tokens")
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        comm.all_to_all(back, grad, in_splits, out_splits, ctx.group, what="all-to-all of expert gradients")
        return back, None, None, None


def _expert_mlps(x: Tensor, counts: list[int], gate_up: Tensor, down: Tensor, act_fn) -> Tensor:
    """(S, H) rows sorted by local expert, `counts[e]` rows each -> (S, H). Every expert runs, even on no
    rows, so every expert parameter gets a gradient (zero) in every step: the runtime reduces a chunk's
    gradients when all its parameters have theirs, on every rank of its group alike."""
    outs, start = [], 0
    for e, (w1, w2) in enumerate(zip(gate_up.unbind(0), down.unbind(0))):  # (2F, H), (H, F)
        rows = x[start : start + counts[e]]  # (n_e, H)
        start += counts[e]
        gate, up = F.linear(rows, w1).chunk(2, dim=-1)  # 2 x (n_e, F)
        outs.append(F.linear(act_fn(gate) * up, w2))  # (n_e, H)
    return torch.cat(outs)


def _balanced_experts(x: Tensor, top_k: int, gate_up: Tensor, down: Tensor, act_fn) -> Tensor:
    """On the meta device routing is unknown: assume it balanced. Each of the E_l local experts gets
    N*k/E_l rows (over an expert-parallel group of P ranks: N*k*P/E from all of them, as many rows in all as
    this rank sends), so the profile sees the experts' real FLOPs and activations."""
    n_local = gate_up.shape[0]
    rows = x.repeat_interleave(top_k, dim=0)  # (S, H)
    per = -(-rows.shape[0] // n_local)
    rows = F.pad(rows, (0, 0, 0, per * n_local - rows.shape[0])).view(n_local, per, -1)  # (E_l, S/E_l, H)
    gate, up = torch.bmm(rows, gate_up.transpose(1, 2)).chunk(2, dim=-1)  # 2 x (E_l, S/E_l, F)
    out = torch.bmm(act_fn(gate) * up, down.transpose(1, 2))  # (E_l, S/E_l, H)
    return out.reshape(-1, x.shape[-1])[: x.shape[0] * top_k]  # (S, H)


def routed_experts(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    act_fn,
    num_experts: int,
    ep_group: ChunkGroup | None = None,
) -> Tensor:
    """The experts' combined output, dropless (see [Note: dropless routing]).

    hidden_states (N, H); top_k_index, top_k_weights (N, k); gate_up (E_l, 2F, H) and down (E_l, H, F) are
    this rank's experts: all E of them without an expert-parallel group, else the E/P of rank i of the
    group of P ranks. Tokens sorted by expert go to the rank holding it by all-to-all, and come back."""
    N, H = hidden_states.shape
    k = top_k_index.shape[-1]
    P = 1 if ep_group is None else ep_group.size
    n_local = num_experts // P
    if hidden_states.device.type == "meta":
        _record_all_to_all(hidden_states, k, P)
        out = _balanced_experts(hidden_states, k, gate_up, down, act_fn)  # (N*k, H)
        return (out.view(N, k, H) * top_k_weights.unsqueeze(-1).to(out.dtype)).sum(1)
    flat = top_k_index.reshape(-1)  # (N*k,): pair s is token s // k
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    x = hidden_states.index_select(0, order // k)  # (S, H)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    if P == 1:
        y = _expert_mlps(x, counts.tolist(), gate_up, down, act_fn)  # (S, H)
    else:
        # how many rows each rank sends each of my experts: (P, E_l), source-major
        recv = torch.empty_like(counts)
        comm.all_to_all(recv, counts, [n_local] * P, [n_local] * P, ep_group, what="all-to-all of expert counts")
        send_splits = counts.view(P, n_local).sum(1).tolist()
        recv_counts = recv.view(P, n_local)
        recv_splits = recv_counts.sum(1).tolist()
        x = _AllToAll.apply(x, recv_splits, send_splits, ep_group)  # (R, H) by source, then expert
        # rows by expert, then source: each local expert's rows contiguous
        starts = (recv_counts.flatten().cumsum(0) - recv_counts.flatten()).view(P, n_local)
        spans = zip(starts.t().flatten().tolist(), recv_counts.t().flatten().tolist())
        perm = torch.cat([torch.arange(s, s + c) for s, c in spans]).to(x.device)
        y = _expert_mlps(x.index_select(0, perm), recv_counts.sum(0).tolist(), gate_up, down, act_fn)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        y = _AllToAll.apply(y.index_select(0, inv), send_splits, recv_splits, ep_group)  # (S, H) back home
    inv_order = torch.empty_like(order)
    inv_order[order] = torch.arange(order.numel(), device=order.device)
    y = y.index_select(0, inv_order).view(N, k, H)  # pair order again
    return (y * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(1)  # (N, H)


class Router(nn.Module):
    """Top-k softmax router: `forward(x (N, H))` -> (probs (N, E), weights (N, k), index (N, k)).

    Top-1 keeps the chosen expert's probability as its weight (Switch Transformer), so the router learns
    from the loss through it; top-k > 1 renormalizes the k weights to sum to one (Mixtral)."""

    def __init__(self, n_embd: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, n_embd))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        probs = F.softmax(F.linear(x, self.weight).float(), dim=-1)  # (N, E)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # (N, k), (N, k)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, index


class Experts(nn.Module):
    """E SwiGLU experts as batched weights, with the Hugging Face experts interface."""

    def __init__(self, n_embd: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, n_embd))  # (E, 2F, H)
        self.down_proj = nn.Parameter(torch.empty(num_experts, n_embd, hidden))  # (E, H, F)
        self.act_fn = F.silu

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return routed_experts(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            self.act_fn,
            self.num_experts,
        )


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer: router, experts, and a load-balancing loss.

    `forward(x (B, T, H))` -> (B, T, H), and leaves `self.aux_loss`, the sequence-wise load-balancing loss
    of Switch Transformer: per sequence, E * sum_e f_e * p_e with f_e the share of the sequence's T*k
    routing choices that went to expert e and p_e its mean router probability; 1 when balanced, averaged
    over the sequences. Per sequence rather than over the batch so that it decomposes exactly over ranks
    that split the batch by sequences, as the language-model loss does: the mean over ranks of each
    rank's loss is the loss of the global batch. The model takes it with `pop_aux_loss()` after each forward,
    so the module keeps no tensor (and no autograd graph) between steps."""

    def __init__(self, n_embd: int, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = Router(n_embd, num_experts, top_k)
        self.experts = Experts(n_embd, hidden, num_experts)
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        flat = x.reshape(B * T, H)  # (N, H)
        probs, weights, index = self.router(flat)  # (N, E), (N, k), (N, k)
        k = index.shape[-1]
        chosen = torch.zeros(B, self.num_experts, device=x.device, dtype=probs.dtype)
        chosen.scatter_add_(1, index.view(B, T * k), torch.ones(B, T * k, device=x.device, dtype=probs.dtype))
        share = chosen * (self.num_experts / (T * k))  # (B, E): f_e * E
        aux_loss = (share * probs.view(B, T, -1).mean(1)).sum(-1).mean()
        if torch._C._current_graph_task_id() == -1:  # not an activation-checkpoint recomputation in backward
            self.aux_loss = aux_loss
        return self.experts(flat, index, weights).view(B, T, H)  # (B, T, H)

    def pop_aux_loss(self) -> Tensor:
        aux_loss, self.aux_loss = self.aux_loss, None
        return aux_loss
