"""Undoing one optimizer update of a flat fp32 master shard, given the gradient it used.

An update that ran during backward on a speculation that later proved wrong (see [Note: the step inside
backward] in overlap.py) is undone here: the master, the optimizer states and the step count go back to
what they were before it, as far as floating point allows. Exactly only where the update is a bijection
that rounding preserves; in general to a few units in the last place of fp32 (tests/test_overlap.py
measures it). The states are rebuilt from the new ones and the gradient: no copy of the old ones is kept,
which would cost as many bytes per parameter as the states themselves.

Supported: Adam and AdamW (without amsgrad: its running maximum forgets what it replaced) and SGD (with
or without momentum, dampening, Nesterov, weight decay). `undoable` says whether an optimizer is one of
them; the others run their update after backward.
"""

from __future__ import annotations

import math

import torch


def undoable(optimizer_class: type, group: dict) -> bool:
    """Whether an update of `optimizer_class` with the hyper-parameters of `group` can be undone."""
    if optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
        return not group.get("amsgrad", False) and not _is_tensor(group.get("lr"))
    if optimizer_class is torch.optim.SGD:
        return not _is_tensor(group.get("lr"))
    return False


def _is_tensor(x) -> bool:
    return torch.is_tensor(x)


@torch.no_grad()
def undo_update(optimizer_class: type, master: torch.Tensor, state: dict, grad: torch.Tensor, group: dict,
                *, fresh: bool) -> None:
    """Reverse the last update of `master` in place. `state`: its optimizer state after that update;
    `grad`: the gradient the update used (after unscaling and clipping); `group`: the hyper-parameters it
    used; `fresh`: the state was made by that update (it did not exist before). A fresh state is
    cleared by the caller."""
    if optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = optimizer_class is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        _undo_adam(master, state, grad, group, decoupled=decoupled, fresh=fresh)
    elif optimizer_class is torch.optim.SGD:
        _undo_sgd(master, state, grad, group, fresh=fresh)
    else:
        raise AssertionError(f"{optimizer_class.__name__} updates cannot be undone")


def _undo_adam(master, state, grad, group, *, decoupled: bool, fresh: bool) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
    step_t = state["step"]
    t = float(step_t)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    g = -grad if group.get("maximize", False) else grad
    # param = param' - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), where param' is after weight decay
    bias_correction1 = 1 - beta1**t
    bias_correction2_sqrt = math.sqrt(1 - beta2**t)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=lr / bias_correction1)
    if decoupled:
        if wd:
            master.div_(1 - lr * wd)
    elif wd:
        g = g.add(master, alpha=wd)  # Adam's L2 term used the parameter before the update
    if not fresh:
        # m = beta1 m_old + (1 - beta1) g, v = beta2 v_old + (1 - beta2) g^2
        exp_avg.sub_(g, alpha=1 - beta1).div_(beta1)
        exp_avg_sq.addcmul_(g, g, value=-(1 - beta2)).div_(beta2).clamp_(min=0)
    step_t.sub_(1)


def _undo_sgd(master, state, grad, group, *, fresh: bool) -> None:
    lr, momentum, dampening = float(group["lr"]), group["momentum"], group["dampening"]
    wd, nesterov = group["weight_decay"], group["nesterov"]
    g = -grad if group.get("maximize", False) else grad
    buf = state.get("momentum_buffer")
    if momentum == 0 or buf is None:
        # param = param_old - lr (g + wd param_old)
        master.add_(g, alpha=lr)
        if wd:
            master.div_(1 - lr * wd)
        return
    if nesterov:
        # param = param_old - lr (d + momentum buf), d = g + wd param_old
        master.add_(g, alpha=lr).add_(buf, alpha=lr * momentum)
        if wd:
            master.div_(1 - lr * wd)
    else:
        master.add_(buf, alpha=lr)  # param = param_old - lr buf
    if not fresh:
        d = g.add(master, alpha=wd) if wd else g
        buf.sub_(d, alpha=1 - dampening).div_(momentum)  # buf = momentum buf_old + (1 - dampening) d
