"""Wrapped models (torch.compile, DistributedDataParallel, DataParallel, nested, PEFT
inside): the same plan as the unwrapped model, with the names the wrapper has."""

from __future__ import annotations

import socket
from typing import Callable, Dict

import pytest
import torch
import torch.distributed as dist
from conftest import MIDDLE, SmallCNN, train_steps
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lips_wrap import LIPS, LayerPlan, LIPSConfig, find_layers
from lips_wrap.layers import strip_wrapper_prefixes, unwrap


@pytest.fixture(scope="module", autouse=True)
def gloo_group():
    """A one-process gloo group on the loopback, as DistributedDataParallel needs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile with the eager backend: same wrapper, no C compiler needed."""
    return torch.compile(model, backend="eager")


# wrapper -> (wrap function, prefix it gives every name, wrapper class names)
WRAPPERS: Dict[str, tuple] = {
    "compile": (compiled, "_orig_mod.", ("OptimizedModule",)),
    "ddp": (DistributedDataParallel, "module.", ("DistributedDataParallel",)),
    "dataparallel": (nn.DataParallel, "module.", ("DataParallel",)),
    "ddp-of-compiled": (lambda m: DistributedDataParallel(compiled(m)), "module._orig_mod.",
                        ("DistributedDataParallel", "OptimizedModule")),
    "compiled-ddp": (lambda m: compiled(DistributedDataParallel(m)), "_orig_mod.module.",
                     ("OptimizedModule", "DistributedDataParallel")),
}


class Tied(nn.Module):
    """A plain model whose head shares its weight with a middle layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)
        self.head.weight = self.mid.weight


def _timm(name: str, **options) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, **options)
    return build


def _hf(builder: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        pytest.importorskip("transformers")
        from test_detect_hf import BUILDERS

        return BUILDERS[builder]()
    return build


def _lora_llama() -> nn.Module:
    peft = pytest.importorskip("peft")
    model = _hf("llama")()
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "plain-cnn": SmallCNN,
    "plain-tied": Tied,
    "timm-efficientnet_b0": _timm("efficientnet_b0"),
    "timm-vit": _timm("vit_tiny_patch16_224", img_size=32, depth=2),
    "timm-resnet18": _timm("resnet18"),
    "hf-bert": _hf("bert"),
    "hf-gpt2": _hf("gpt2"),
    "peft-lora-llama": _lora_llama,
}


def assert_same_plan(wrapped: nn.Module, plan: LayerPlan, plain_plan: LayerPlan,
                     prefix: str) -> None:
    """``plan`` is ``plain_plan`` with ``prefix`` in front of every name, and each of
    its names is a parameter and a state-dict key of ``wrapped``."""
    assert plan.eligible_names == tuple(prefix + n for n in plain_plan.eligible_names)
    assert plan.detector == plain_plan.detector
    assert plan.prefix == prefix
    expected = [
        (prefix + d.name, d.shape, d.eligible, d.reason, tuple(prefix + a for a in d.aliases))
        for d in plain_plan.decisions
    ]
    # Reasons read as on the unwrapped model; one naming a tied tensor names it as
    # the wrapped model does.
    got = [(d.name, d.shape, d.eligible, d.reason.replace(prefix, ""), d.aliases)
           for d in plan.decisions]
    assert got == expected
    keys = set(wrapped.state_dict())
    for decision in plan.decisions:
        for name in (decision.name,) + decision.aliases:
            assert name in keys
            assert wrapped.get_parameter(name).shape == decision.shape
            assert plan.unwrapped_name(name) == name[len(prefix):]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_wrapped_model_has_the_plan_of_the_unwrapped_one(kind, wrapper):
    torch.manual_seed(0)
    model = MODELS[kind]()
    plain_plan = find_layers(model)
    wrap, prefix, classes = WRAPPERS[wrapper]
    wrapped = wrap(model)
    plan = find_layers(wrapped)
    assert_same_plan(wrapped, plan, plain_plan, prefix)
    assert plan.wrappers == classes
    assert unwrap(wrapped) == (model, prefix, classes)
    assert plan.summary() == (
        plain_plan.summary() + f" (inside {' > '.join(classes)}: names start with {prefix!r})"
    )


def test_compiled_efficientnet_keeps_conv_head_exempt_and_timm_reasons():
    """The case that went silently wrong: compiled, the names missed timm's group
    matcher and the generic rule masked conv_head under the label 'timm metadata'."""
    pytest.importorskip("timm")
    plan = find_layers(compiled(_timm("efficientnet_b0")()))
    by_name = {d.name: d for d in plan.decisions}
    head = by_name["_orig_mod.conv_head.weight"]
    assert not head.eligible
    assert head.reason == "timm group_matcher: blocks, after the last block"
    assert not any("generic rule" in d.reason for d in plan.decisions)


def test_timm_model_in_ddp_is_detected_by_timm_metadata():
    pytest.importorskip("timm")
    plan = find_layers(DistributedDataParallel(_timm("resnet18")()))
    assert plan.detector == "timm metadata"
    assert plan.eligible_names[0] == "module.layer1.0.conv1.weight"


@pytest.mark.parametrize("wrapper", ["compile", "ddp-of-compiled"])
def test_patterns_match_with_or_without_the_prefix(cnn, wrapper):
    wrap, prefix, _ = WRAPPERS[wrapper]
    model = wrap(cnn)
    bare = find_layers(model, include=["head.weight"], exclude=["conv1.*"])
    prefixed = find_layers(model, include=[prefix + "head.weight"], exclude=[prefix + "conv1.*"])
    assert bare.eligible_names == prefixed.eligible_names == tuple(
        prefix + name for name in ("conv2.weight", "fc.weight", "head.weight")
    )
    reasons = {d.name: d.reason for d in bare.decisions}
    assert reasons[prefix + "conv1.weight"] == "exclude pattern 'conv1.*'"
    assert reasons[prefix + "head.weight"] == "include pattern 'head.weight'"


def test_a_pattern_matching_nothing_says_the_prefix_may_be_left_out(cnn):
    with pytest.raises(ValueError, match=r"'nope\.\*' matches no parameter name; names look "
                       r"like '_orig_mod\.stem\.weight'.*prefix '_orig_mod\.' may be left out"):
        find_layers(compiled(cnn), exclude=["nope.*"])


def test_unknown_wrapper_like_modules_are_not_unwrapped():
    class DataParallel(nn.Module):  # same class name, but holds a parameter of its own
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module
            self.scale = nn.Parameter(torch.ones(1))

    model = DataParallel(SmallCNN())
    assert unwrap(model) == (model, "", ())
    assert find_layers(model).eligible_names == tuple("module." + n for n in MIDDLE)


def test_fsdp_wrapped_models_are_refused_not_planned_on_shards():
    class FullyShardedDataParallel(nn.Module):  # FSDP1's class, by name
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = module

    model = nn.Sequential(nn.Linear(2, 2), FullyShardedDataParallel(SmallCNN()))
    with pytest.raises(ValueError, match=r"^1 is a FullyShardedDataParallel: its parameters "
                       r"are flattened and sharded.*Use DistributedDataParallel"):
        find_layers(model)


def test_strip_wrapper_prefixes():
    assert strip_wrapper_prefixes("module._orig_mod.fc.weight") == "fc.weight"
    assert strip_wrapper_prefixes("_orig_mod.module.fc.weight") == "fc.weight"
    assert strip_wrapper_prefixes("fc.module.weight") == "fc.module.weight"


@pytest.mark.parametrize("wrapper", ["compile", "ddp", "ddp-of-compiled"])
def test_lips_masks_the_same_entries_of_a_wrapped_model(wrapper):
    """LIPS on a wrapped model, after a real step through the wrapper: the same
    tensors and entries masked as on the unwrapped twin, and the wrapper's forward
    sees the masked weights."""
    config = LIPSConfig(total_rounds=10)
    wrap, prefix, _ = WRAPPERS[wrapper]
    torch.manual_seed(0)
    plain = SmallCNN()
    torch.manual_seed(0)
    inner = SmallCNN()
    wrapped = wrap(inner)
    plain_lips = LIPS(plain, torch.optim.SGD(plain.parameters(), lr=0.1), config)
    lips = LIPS(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), config)
    assert lips.plan.eligible_names == tuple(prefix + n for n in MIDDLE)
    train_steps(plain, plain_lips.optimizer, steps=1)
    train_steps(wrapped, lips.optimizer, steps=1)
    before = {n: p.detach().clone() for n, p in inner.named_parameters()}
    plain_report, report = plain_lips.on_global_model(1), lips.on_global_model(1)
    assert report.tensors_masked == plain_report.tensors_masked == len(MIDDLE)
    assert report.elements_zeroed == plain_report.elements_zeroed
    assert report.fallback == ()
    for name, param in inner.named_parameters():
        assert (not torch.equal(before[name], param)) == (name in MIDDLE), name
        assert torch.equal(param == 0, plain.get_parameter(name) == 0), name
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), plain(x))
