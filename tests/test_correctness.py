"""Paths where LIPS used to be silently wrong (issue 11): each test failed on the old code."""

import gc
import warnings

import pytest
import torch
from conftest import MIDDLE, SmallCNN
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lips_wrap import LIPS, LIPSConfig, find_layers, mask_global_state
from lips_wrap.masking import keep_count, keep_mask
from lips_wrap.selection import apply_selection_, select_top_k


def channels_last_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 3),
    )


def steps(model, optimizer, n=1, shape=(6, 1, 8, 8), memory_format=None, scaler=None):
    generator = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(*shape, generator=generator)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        y = torch.randint(0, 3, (shape[0],), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def small_lips(lr=0.1, momentum=0.0, **config):
    """(model, inner SGD, LIPS) on the small CNN, seeded."""
    torch.manual_seed(0)
    model = SmallCNN()
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return model, inner, LIPS(model, inner, LIPSConfig(total_rounds=10, **config))


# -- 1. every memory format masks every target with the same entries ------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam_amsgrad"])
def test_channels_last_state_masked_where_the_weight_is(optimizer):
    model = channels_last_net().to(memory_format=torch.channels_last)
    inner = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), amsgrad=True)
    )
    lips = LIPS(model, inner, LIPSConfig(total_rounds=10, start_density=0.3))
    steps(model, lips.optimizer, memory_format=torch.channels_last)
    report = lips.on_global_model(1)
    assert report.tensors_masked > 0
    for name in lips.plan.eligible_names:
        weight = model.get_parameter(name)
        kept = weight != 0
        assert int(kept.sum()) == keep_count(weight.numel(), 0.3), name
        for key, state in inner.state[weight].items():
            if isinstance(state, torch.Tensor) and state.shape == weight.shape:
                assert not bool(state[~kept].any()), f"{name} {key} non-zero where dropped"
                assert bool(state[kept].ne(0).all()), f"{name} {key} wiped where kept"


@pytest.mark.parametrize("layout", ["channels_last_3d", "transposed"])
def test_other_layouts_mask_state_like_the_weight(layout):
    torch.manual_seed(0)
    if layout == "channels_last_3d":
        model = nn.Sequential(nn.Conv3d(1, 3, 2), nn.Conv3d(3, 4, 2), nn.Conv3d(4, 4, 2),
                              nn.Flatten(), nn.Linear(4, 3))
        model = model.to(memory_format=torch.channels_last_3d)
        shape = (4, 1, 4, 4, 4)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 7), nn.Linear(7, 3))
        with torch.no_grad():  # a weight stored transposed (non-contiguous)
            model[1].weight = nn.Parameter(model[1].weight.detach().t().contiguous().t())
        shape = (6, 5)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lips = LIPS(model, inner, LIPSConfig(total_rounds=10, start_density=0.4,
                                         include=["1.weight"]))
    steps(model, lips.optimizer, shape=shape)
    lips.on_global_model(1)
    weight = model[1].weight
    kept = weight != 0
    assert int(kept.sum()) == keep_count(weight.numel(), 0.4)
    momentum = inner.state[weight]["momentum_buffer"]
    assert not bool(momentum[~kept].any()) and bool(momentum[kept].ne(0).all())


# -- 2. GradScaler + fused / foreach / for-loop: wrapped == bare, bitwise ---------------
IMPLEMENTATIONS = [
    (cls, impl) for cls in ("SGD", "AdamW") for impl in ("fused", "foreach", "forloop")
]


def _optimizer(cls, impl, params):
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    if cls == "SGD":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, **kwargs)
    return torch.optim.AdamW(params, lr=1e-2, **kwargs)


@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "gradscaler"])
@pytest.mark.parametrize("cls,impl", IMPLEMENTATIONS)
def test_wrapped_training_is_bitwise_bare_training(cls, impl, use_scaler):
    torch.manual_seed(0)
    model = SmallCNN()
    twin = SmallCNN()
    twin.load_state_dict(model.state_dict())
    lips = LIPS(model, _optimizer(cls, impl, model.parameters()),
                LIPSConfig(total_rounds=10))
    bare = _optimizer(cls, impl, twin.parameters())

    def scaler():
        if not use_scaler:
            return None
        return torch.amp.GradScaler("cpu", init_scale=4096.0, growth_interval=1)

    steps(model, lips.optimizer, n=3, shape=(5, 1, 6, 6), scaler=scaler())
    steps(twin, bare, n=3, shape=(5, 1, 6, 6), scaler=scaler())
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    # the kept gradient is the unscaled one
    for name in MIDDLE:
        kept = lips.optimizer.captured_grad(model.get_parameter(name))
        grad = twin.get_parameter(name).grad  # unscaled after the step, on every path
        assert torch.allclose(kept.float(), grad.to(kept.dtype).float(), rtol=1e-2,
                              atol=1e-6), name


def test_fused_inf_step_is_skipped_and_not_kept():
    torch.manual_seed(0)
    model = SmallCNN()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True),
                LIPSConfig(total_rounds=10))
    steps(model, lips.optimizer, shape=(5, 1, 6, 6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kept_before = lips.optimizer.captured_grad(model.conv1.weight).clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x = torch.full((5, 1, 6, 6), 1e38)
    lips.optimizer.zero_grad()
    scaler.scale(model(x).sum()).backward()
    scaler.step(lips.optimizer)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert torch.equal(lips.optimizer.captured_grad(model.conv1.weight), kept_before)


# -- 3. a finite gradient beyond float16's range saturates ------------------------------
def test_gradient_beyond_float16_range_is_kept_saturated():
    model, _, lips = small_lips(lr=0.0, grad_dtype=torch.float16)
    steps(model, lips.optimizer, shape=(5, 1, 6, 6))
    weight = model.conv1.weight
    weight.grad = torch.zeros_like(weight)
    weight.grad.view(-1)[7] = 7e4
    weight.grad.view(-1)[9] = -1e5
    lips.optimizer.step()
    stored = lips.optimizer.captured_grad(weight)  # float16 holds them as +-inf ...
    assert stored.view(-1)[7] == float("inf") and stored.view(-1)[9] == float("-inf")
    lips.load_state_dict(lips.state_dict())  # ... which a state round trip accepts
    with torch.no_grad():
        weight.view(-1)[7] = weight.view(-1)[9] = 0.0  # and inf * 0 is no NaN score
        weight.view(-1)[8] = 1e-3
    lips.on_global_model(1)  # no "divergence" error: ranked as saturated (65504)
    assert weight.view(-1)[8] != 0  # 1e-3 * 65504 = 65.5 ranks among the largest


# -- 4. non-finite optimizer state at dropped entries becomes exactly zero --------------
def test_non_finite_state_at_dropped_entries_becomes_zero():
    model, inner, lips = small_lips(lr=0.1, momentum=0.9)
    steps(model, lips.optimizer, shape=(5, 1, 6, 6))
    momentum = inner.state[model.conv1.weight]["momentum_buffer"]
    momentum.fill_(float("inf"))
    momentum.view(-1)[::2] = float("nan")
    lips.on_global_model(1)
    dropped = model.conv1.weight == 0
    assert bool(dropped.any())
    values = momentum[dropped]
    assert torch.equal(values, torch.zeros_like(values))
    assert not torch.signbit(values).any()


# -- 5. load_state_dict validates the whole dict, changes nothing on error --------------
def _trained_lips():
    model, _, lips = small_lips(lr=0.1)
    steps(model, lips.optimizer, shape=(5, 1, 6, 6))
    lips.on_global_model(0)
    return model, lips


@pytest.mark.parametrize(
    "bad,words",
    [
        ({"version": 1}, "grads"),
        ({"version": 1, "grads": {}}, "last_round"),
        ({"version": 1, "last_round": None}, "grads"),
        ({"version": 1, "last_round": None, "grads": None}, "grads"),
        ({"version": 1, "last_round": None, "grads": []}, "grads"),
        ({"version": 1, "last_round": None, "grads": {"conv1.weight": [1, 2]}},
         "conv1.weight"),
        ({"version": 1, "last_round": "3", "grads": {}}, "last_round"),
        ({"version": 1, "last_round": None, "grads": {}, "surprise": 1}, "surprise"),
    ],
)
def test_load_state_dict_rejects_malformed_state_and_keeps_its_own(bad, words):
    model, lips = _trained_lips()
    before = lips.state_dict()
    with pytest.raises(ValueError, match=words):
        lips.load_state_dict(bad)
    after = lips.state_dict()
    assert after["last_round"] == before["last_round"] == 0
    assert set(after["grads"]) == set(before["grads"])
    for name, grad in before["grads"].items():
        assert torch.equal(after["grads"][name], grad)


def test_load_state_dict_round_trip_still_works():
    model, lips = _trained_lips()
    state = lips.state_dict()
    lips.load_state_dict(state)
    assert lips.state_dict()["last_round"] == 0


# -- 6. server side: previous of another shape or dtype names the tensor ----------------
def test_server_previous_of_another_shape_is_refused():
    torch.manual_seed(0)
    model = SmallCNN()
    plan = find_layers(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    previous = {k: v.clone() for k, v in state.items()}
    previous["conv2.weight"] = previous["conv2.weight"][:1]
    config = LIPSConfig(total_rounds=10)
    with pytest.raises(ValueError, match="conv2.weight"):
        mask_global_state(state, previous, plan, 1, config)
    previous = {k: v.clone() for k, v in state.items()}
    previous["conv1.weight"] = previous["conv1.weight"].to(torch.int64)
    with pytest.raises(ValueError, match="conv1.weight"):
        mask_global_state(state, previous, plan, 1, config)


# -- 7. the "already wrapped" guard dies with the wrapper -------------------------------
def test_optimizer_can_be_wrapped_again_once_its_lips_is_gone():
    model, inner, lips = small_lips(lr=0.1)
    with pytest.raises(ValueError, match="already wrapped"):
        LIPS(model, inner, LIPSConfig(total_rounds=10))
    del lips
    gc.collect()
    again = LIPS(model, inner, LIPSConfig(total_rounds=10))
    steps(model, again.optimizer, shape=(5, 1, 6, 6))
    assert again.on_global_model(1).fallback == ()


# -- 8. training with the raw optimizer is said, not silently lost ----------------------
def test_training_with_the_raw_optimizer_warns_with_the_fix():
    model, inner, lips = small_lips(lr=0.1)
    lips.on_global_model(0)
    steps(model, inner, n=2, shape=(5, 1, 6, 6))
    with pytest.warns(UserWarning, match="lips.optimizer"):
        report = lips.on_global_model(1)
    assert report.fallback  # it still masks (by magnitude) and says so


def test_training_with_a_new_optimizer_warns():
    model, _, lips = small_lips(lr=0.1)
    lips.on_global_model(0)
    steps(model, torch.optim.SGD(model.parameters(), lr=0.1), n=3, shape=(5, 1, 6, 6))
    with pytest.warns(UserWarning, match="lips.optimizer"):
        lips.on_global_model(1)


def test_raw_optimizer_can_be_an_error():
    model, inner, lips = small_lips(lr=0.1, unwrapped_training="error")
    lips.on_global_model(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps(model, inner, n=1, shape=(5, 1, 6, 6))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="lips.optimizer"):
        lips.on_global_model(1)
    assert not torch.equal(trained["conv1.weight"], before["conv1.weight"])
    for name, param in model.named_parameters():  # nothing masked on error
        assert torch.equal(param, trained[name]), name


def test_wrapped_training_and_shared_simulation_do_not_warn():
    model, _, lips = small_lips(lr=0.1, period=1)
    fresh = lips.state_dict()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    states = {c: fresh for c in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rnd in range(3):
            for client in range(3):
                lips.load_state_dict(states[client])
                model.load_state_dict(global_state)
                lips.on_global_model(rnd)
                steps(model, lips.optimizer, n=2, shape=(5, 1, 6, 6))
                states[client] = lips.state_dict()


def test_config_rejects_unknown_unwrapped_training():
    with pytest.raises(ValueError, match="unwrapped_training"):
        LIPSConfig(total_rounds=3, unwrapped_training="shout")


# -- parameters replaced after LIPS was built (e.g. sharding) ---------------------------
def test_replaced_parameters_are_refused():
    model, _, lips = small_lips(lr=0.1)
    model.conv1.weight = nn.Parameter(model.conv1.weight.detach().clone())
    with pytest.raises(RuntimeError, match="conv1.weight"):
        lips.on_global_model(1)


# -- 12. FSDP2 / DTensor parameters are refused at construction -------------------------
def test_sharded_parameters_are_refused(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = fully_shard(SmallCNN(), mesh=mesh)
        with pytest.raises(ValueError, match="sharded DTensors.*DistributedDataParallel"):
            LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 LIPSConfig(total_rounds=10))
        # built before sharding: the replaced parameters are caught at the next call
        model = SmallCNN()
        lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    LIPSConfig(total_rounds=10))
        fully_shard(model, mesh=mesh)
        with pytest.raises(RuntimeError, match="no longer the one LIPS was built with"):
            lips.on_global_model(1)
    finally:
        dist.destroy_process_group()


# -- property tests: every layout, every optimizer implementation -----------------------
LAYOUTS = ("contiguous", "channels_last", "channels_last_3d", "transposed", "strided")


def _laid_out(values, layout):
    """``values`` (5-D) with the same logical entries in another memory layout."""
    if layout == "channels_last_3d":
        return values.contiguous(memory_format=torch.channels_last_3d)
    if layout == "channels_last":  # channels last, as torch.channels_last lays out 4-D
        return values.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    if layout == "transposed":
        return values.transpose(0, 4).contiguous().transpose(0, 4)
    if layout == "strided":
        wide = torch.zeros(*values.shape[:-1], values.shape[-1] * 2, dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    return values.clone()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 4)] * 5),
    layouts=st.lists(st.sampled_from(LAYOUTS), min_size=1, max_size=4),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    specials=st.booleans(),
)
def test_every_layout_masks_the_same_entries(shape, layouts, density, seed, specials):
    generator = torch.Generator().manual_seed(seed)
    score = torch.randn(*shape, generator=generator)
    k = keep_count(score.numel(), density)
    keep = keep_mask(score, k)
    originals = []
    for _ in layouts:
        values = torch.randn(*shape, generator=generator)
        if specials:
            values.view(-1)[::3] = float("inf")
            values.view(-1)[1::3] = float("nan")
        originals.append(values)
    targets = [_laid_out(v, layout) for v, layout in zip(originals, layouts)]
    apply_selection_(targets, score, select_top_k(score, k), chunk=7)
    for target, values, layout in zip(targets, originals, layouts):
        dropped = target[~keep]
        assert torch.equal(dropped, torch.zeros_like(dropped)), layout
        assert not torch.signbit(dropped).any(), layout
        assert torch.equal(target[keep].nan_to_num(), values[keep].nan_to_num()), layout


OPTIMIZER_CLASSES = {
    "SGD": lambda p, **kw: torch.optim.SGD(p, lr=0.05, momentum=0.9, **kw),
    "Adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-2, amsgrad=True, **kw),
    "AdamW": lambda p, **kw: torch.optim.AdamW(p, lr=1e-2, **kw),
    "Adagrad": lambda p, **kw: torch.optim.Adagrad(p, lr=1e-2, **kw),
}


@settings(max_examples=25, deadline=None)
@given(
    cls=st.sampled_from(sorted(OPTIMIZER_CLASSES)),
    impl=st.sampled_from(["fused", "foreach", "forloop"]),
    channels_last=st.booleans(),
    density=st.floats(0.1, 0.9),
)
def test_every_optimizer_implementation_masks_its_state(cls, impl, channels_last, density):
    model = channels_last_net()
    memory_format = torch.channels_last if channels_last else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    inner = OPTIMIZER_CLASSES[cls](model.parameters(), **kwargs)
    lips = LIPS(model, inner, LIPSConfig(total_rounds=10, start_density=density))
    steps(model, lips.optimizer, n=2, memory_format=memory_format)
    before = {
        (name, key): value.clone()
        for name in lips.plan.eligible_names
        for key, value in inner.state[model.get_parameter(name)].items()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    }
    lips.on_global_model(1)
    for (name, key), value in before.items():
        weight = model.get_parameter(name)
        kept = weight != 0
        assert int(kept.sum()) == keep_count(weight.numel(), density), name
        state = inner.state[weight][key]
        assert not bool(state[~kept].any()), (name, key)
        assert torch.equal(state[kept], value[kept]), (name, key)


def test_loading_the_global_model_after_the_mask_warns():
    model, _, lips = small_lips(lr=0.1)
    steps(model, lips.optimizer, shape=(5, 1, 6, 6))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    lips.on_global_model(1)
    model.load_state_dict(global_state)  # wrong order: the mask is overwritten
    with pytest.warns(UserWarning, match="Load the global model first"):
        steps(model, lips.optimizer, shape=(5, 1, 6, 6))
    # the right order is silent, and only the first step checks
    model.load_state_dict(global_state)
    lips.on_global_model(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(model, lips.optimizer, n=2, shape=(5, 1, 6, 6))


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_unscale_then_clip_then_step_keeps_the_unscaled_gradient(impl):
    """The common AMP recipe with gradient clipping: scaler.unscale_ before step."""
    results = []
    for wrapped in (True, False):
        torch.manual_seed(0)
        model = SmallCNN()
        inner = _optimizer("SGD", impl, model.parameters())
        lips = LIPS(model, inner, LIPSConfig(total_rounds=10)) if wrapped else None
        optimizer = lips.optimizer if wrapped else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(5, 1, 6, 6, generator=generator)
        y = torch.randint(0, 3, (5,), generator=generator)
        optimizer.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        clipped = model.conv1.weight.grad.clone()
        scaler.step(optimizer)
        scaler.update()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if wrapped:
            kept = lips.optimizer.captured_grad(model.conv1.weight)
            assert torch.allclose(kept.float(), clipped.to(kept.dtype).float(), rtol=1e-3,
                                  atol=1e-7)
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
