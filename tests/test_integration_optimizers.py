"""Optimizers beyond the built-in elementwise ones: subclasses that keep their base's update, classes that declare
themselves elementwise, and the errors (with the alternative) for the others. See [Note: elementwise optimizers]
in elixir/optim/sharded.py."""

import copy
import warnings

import pytest
import torch

import elixir
from helpers import assert_close_rel, assert_params_close, batches, build, loss_of, make_plan


class AdamWWithDefaults(torch.optim.AdamW):
    """A subclass as people write them: other defaults and a helper, the update untouched."""

    def __init__(self, params, lr: float = 1e-2, weight_decay: float = 0.05):
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    def current_lr(self) -> float:
        return self.param_groups[0]["lr"]


class LoggingSGD(torch.optim.SGD):
    """Defines its own step (here only to count calls) and vouches that the update stays elementwise."""

    elixir_elementwise = True
    calls = 0

    @torch.no_grad()
    def step(self, closure=None):
        type(self).calls += 1
        return super().step(closure)


class SignSGD(torch.optim.Optimizer):
    """Not a subclass of any torch optimizer: p -= lr * sign(g + beta * m), m = beta * m + g per element."""

    elixir_elementwise = True

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.5):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                p.add_(torch.sign(p.grad + g["beta"] * m), alpha=-g["lr"])
                m.mul_(g["beta"]).add_(p.grad)


def _train(model, make_opt, data, plan_kind=None):
    opt = make_opt(model.parameters())
    if plan_kind is not None:
        model, opt = elixir.wrap(model, opt, plan=make_plan(model, plan_kind, opt))
    losses = []
    for x in data:
        loss = loss_of(model, x)
        opt.backward(loss) if plan_kind else loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    params = elixir.full_state_dict(model) if plan_kind else {n: p.detach() for n, p in model.named_parameters()}
    return losses, params, model


@pytest.mark.parametrize(
    "make_opt", [AdamWWithDefaults, lambda p: LoggingSGD(p, lr=0.05, momentum=0.9), lambda p: SignSGD(p, lr=1e-3)],
    ids=["adamw-subclass", "sgd-subclass-own-step", "declared-elementwise"],
)
def test_accepted_optimizers_train_like_they_do_per_tensor(make_opt):
    model = build("gpt")
    data = batches(4)
    ref_losses, ref_params, _ = _train(copy.deepcopy(model), make_opt, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "... updates cannot be undone, so they run after backward"
        # small chunks, on the host: shards cut tensors anywhere, and the per-element update must not care
        losses, params, wrapped = _train(copy.deepcopy(model), make_opt, data, "host")
    assert_close_rel(losses, ref_losses, 1e-6)
    assert_params_close(params, ref_params, 1e-5)
    # only the classes undo.py knows run inside backward; a subclass updates after it
    assert elixir.step_stats(wrapped)["overlap"] is False


def test_a_subclass_runs_its_own_class_on_the_shards():
    model = build("gpt")
    LoggingSGD.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(model, lambda p: LoggingSGD(p, lr=0.05), batches(2), "on_demand")
    assert LoggingSGD.calls > 2  # once per chunk and step: the user's step ran, not SGD's


class OwnStepAdamW(torch.optim.AdamW):
    @torch.no_grad()
    def step(self, closure=None):
        return super().step(closure)


class NotElementwiseAdam(torch.optim.Adam):
    elixir_elementwise = False


@pytest.mark.parametrize("make_opt, says", [
    (OwnStepAdamW, ["defines its own step()", "elixir_elementwise = True", "torch.optim.AdamW itself"]),
    (NotElementwiseAdam, ["elixir_elementwise = False", "AdamW(fused=True)"]),
    (lambda p: torch.optim.Adafactor(p), ["Adafactor", "rows and columns", "torch.optim.AdamW"]),
    (lambda p: torch.optim.LBFGS(p), ["LBFGS", "line-search", "torch.optim.AdamW"]),
    (lambda p: torch.optim.Rprop(p), ["Rprop is not supported", "elixir_elementwise = True", "AdamW(fused=True)"]),
], ids=["own-step", "declared-not", "adafactor", "lbfgs", "unknown"])
def test_refused_optimizers_say_why_and_name_the_alternative(make_opt, says):
    model = build("gpt")
    opt = make_opt(model.parameters())
    with pytest.raises(ValueError) as e:
        elixir.wrap(model, opt, plan=make_plan(model, "resident", opt))
    for words in says:
        assert words in str(e.value), str(e.value)


def test_muon_is_refused_before_anything_is_allocated():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    opt = torch.optim.Muon(model.parameters())
    with pytest.raises(ValueError, match="orthogonalizes"):
        elixir.wrap(model, opt)  # plan="auto": refused at wrap, not at the first forward
    with pytest.raises(ValueError, match="not wrapped"):  # nothing left pending for the first forward either
        elixir.plan_of(model)
