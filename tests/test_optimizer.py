import pytest
import torch
from conftest import MIDDLE, SmallCNN, train_steps

from lips_wrap import LIPS, LIPSConfig, LIPSOptimizer

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def make(name, **config):
    torch.manual_seed(0)
    model = SmallCNN()
    inner = OPTIMIZERS[name](model.parameters())
    lips = LIPS(model, inner, LIPSConfig(total_rounds=10, period=1, **config))
    return model, inner, lips


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_wrapper_is_an_optimizer_that_delegates(name):
    model, inner, lips = make(name)
    opt = lips.optimizer
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, LIPSOptimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    assert opt.state_dict() == inner.state_dict()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_steps_match_the_bare_optimizer(name):
    model, _, lips = make(name)
    torch.manual_seed(0)
    twin = SmallCNN()
    bare = OPTIMIZERS[name](twin.parameters())
    train_steps(model, lips.optimizer, steps=3)
    train_steps(twin, bare, steps=3)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_state_tensor_masked_with_the_weight(name):
    model, inner, lips = make(name)
    train_steps(model, lips.optimizer, steps=2)
    report = lips.on_global_model(1)
    assert report.masked
    for pname in MIDDLE:
        param = model.get_parameter(pname)
        zero = param == 0
        state_tensors = [v for v in inner.state[param].values()
                         if torch.is_tensor(v) and v.shape == param.shape]
        if name != "sgd":
            assert state_tensors, f"{name} keeps per-parameter state"
        for value in state_tensors:
            assert bool((value[zero] == 0).all()), pname
    untouched = model.get_parameter("head.weight")
    for value in inner.state[untouched].values():
        if torch.is_tensor(value) and value.shape == untouched.shape:
            assert bool((value != 0).any())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip(name):
    model, inner, lips = make(name)
    train_steps(model, lips.optimizer, steps=2)
    saved = lips.optimizer.state_dict()
    model2, inner2, lips2 = make(name)
    lips2.optimizer.load_state_dict(saved)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        for key, value in inner.state[p1].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(inner2.state[p2][key]))


@pytest.mark.parametrize("scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
])
def test_lr_schedulers_drive_the_wrapped_optimizer(scheduler):
    model, inner, lips = make("sgd_momentum")
    sched = scheduler(lips.optimizer)
    first = inner.param_groups[0]["lr"]
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # no "step() before optimizer.step()"
        for _ in range(3):
            train_steps(model, lips.optimizer, steps=1)
            sched.step()
    assert inner.param_groups[0]["lr"] != first
    assert lips.optimizer.captured_grad(model.get_parameter("conv1.weight")) is not None


def test_grad_scaler_accepts_the_wrapper():
    model, inner, lips = make("sgd_momentum")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    lips.optimizer.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(lips.optimizer)
    scaler.update()
    param = model.get_parameter("conv1.weight")
    # the gradient kept is the unscaled one
    assert torch.allclose(lips.optimizer.captured_grad(param).float(), param.grad, rtol=1e-2,
                          atol=1e-4)


def test_captured_gradient_is_the_last_step_in_grad_dtype():
    model, _, lips = make("sgd", grad_dtype=torch.bfloat16)
    param = model.get_parameter("fc.weight")
    assert lips.optimizer.captured_grad(param) is None
    train_steps(model, lips.optimizer, steps=2)
    kept = lips.optimizer.captured_grad(param)
    assert kept.dtype == torch.bfloat16
    assert torch.equal(kept, param.grad.to(torch.bfloat16))
    assert lips.optimizer.captured_grad(model.get_parameter("fc.weight")) is kept


def test_closure_step_captures_after_the_closure():
    torch.manual_seed(0)
    model = SmallCNN()
    lips = LIPS(model, torch.optim.LBFGS(model.parameters(), max_iter=2), LIPSConfig(10))
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])

    def closure():
        lips.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = lips.optimizer.step(closure)
    assert torch.is_tensor(loss)
    assert lips.optimizer.captured_grad(model.get_parameter("conv2.weight")) is not None


def test_add_param_group_and_zero_grad_delegate():
    model, inner, lips = make("sgd")
    extra = torch.nn.Parameter(torch.zeros(2))
    lips.optimizer.add_param_group({"params": [extra]})
    assert len(inner.param_groups) == 2
    train_steps(model, lips.optimizer, steps=1)
    lips.optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_hooks_registered_on_the_wrapper_run():
    model, inner, lips = make("sgd")
    calls = []
    lips.optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    train_steps(model, lips.optimizer, steps=1)
    assert len(calls) == 1


def test_double_wrap_refused():
    model, inner, lips = make("adam")
    with pytest.raises(ValueError, match="already a LIPSOptimizer"):
        LIPS(model, lips.optimizer, LIPSConfig(10))
    with pytest.raises(ValueError, match="already wrapped by another LIPS"):
        LIPS(model, inner, LIPSConfig(10))


def test_repr_names_the_wrapped_optimizer():
    assert repr(make("adam")[2].optimizer).startswith("LIPSOptimizer(Adam (")
