"""Layer detection for timm models: group_matcher, pretrained_cfg, family table, fallback."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lips_wrap import LIPS, LIPSConfig, families, find_layers

timm = pytest.importorskip("timm")

# name, create_model options, regex of the block groups' parameter names
MODELS = [
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 3}, r"^blocks\."),
    ("deit_tiny_patch16_224", {"img_size": 32, "depth": 2}, r"^blocks\."),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}, r"^blocks\."),
    ("resnet18", {}, r"^layer[1-4]\."),
    ("resnet50", {}, r"^layer[1-4]\."),
    ("convnext_atto", {}, r"^stages\."),
    ("swin_tiny_patch4_window7_224", {}, r"^layers\."),
    ("efficientnet_b0", {}, r"^blocks\."),
    ("mobilenetv3_small_100", {}, r"^blocks\."),
    ("vgg11_bn", {}, r"^features\.(?!0\.)"),
    ("regnetx_002", {}, r"^s[1-4]\."),
    ("caformer_s18", {}, r"^stages\."),  # no group_matcher: family table row
    ("cait_xxs24_224", {"depth": 2}, r"^blocks(_token_only)?\."),  # callable group_matcher
]


def build(name: str, **options) -> nn.Module:
    """timm model on the meta device: structure and shapes, no memory, no weights."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **options)


def layer_weights_matching(model: nn.Module, pattern: str) -> set:
    """Independent expectation: Linear/Conv weights whose names match ``pattern``."""
    return {
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and re.match(pattern, module_name + ".")
    }


@pytest.mark.parametrize("name, options, blocks", MODELS, ids=[m[0] for m in MODELS])
def test_eligible_are_exactly_the_block_layer_weights(name, options, blocks):
    model = build(name, **options)
    plan = find_layers(model)
    assert plan.detector == "timm metadata"
    assert set(plan.eligible_names) == layer_weights_matching(model, blocks)
    assert not any("generic rule" in d.reason for d in plan.decisions)


@pytest.mark.parametrize("name, options, blocks", MODELS, ids=[m[0] for m in MODELS])
def test_stem_head_norms_biases_are_exempt_with_metadata_reasons(name, options, blocks):
    model = build(name, **options)
    plan = find_layers(model)
    by_name = {d.name: d for d in plan.decisions}
    cfg = model.pretrained_cfg
    classifiers = [cfg["classifier"]] if isinstance(cfg["classifier"], str) else cfg["classifier"]
    for prefix in [cfg["first_conv"], *classifiers]:
        decision = by_name[f"{prefix}.weight"]
        assert not decision.eligible
        assert "pretrained_cfg" in decision.reason
    for decision in plan.decisions:
        if decision.name.endswith("bias") or len(decision.shape) <= 1:
            assert not decision.eligible, decision.name


def test_vit_tensors_by_name():
    model = build("vit_tiny_patch16_224", img_size=32, depth=2)
    plan = find_layers(model)
    by_name = {d.name: d for d in plan.decisions}
    for block in range(2):
        for tensor in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            decision = by_name[f"blocks.{block}.{tensor}.weight"]
            assert decision.eligible
            assert decision.reason == f"timm group_matcher: blocks {block} (Linear)"
    assert by_name["cls_token"].reason == "timm group_matcher: stem"
    assert by_name["pos_embed"].reason == "timm group_matcher: stem"
    assert by_name["patch_embed.proj.weight"].reason.startswith("timm pretrained_cfg['first_conv']")
    assert by_name["head.weight"].reason.startswith("timm pretrained_cfg['classifier']")
    assert by_name["norm.weight"].reason == "timm group_matcher: blocks, after the last block"
    assert by_name["blocks.0.norm1.weight"].reason == "normalisation (LayerNorm)"
    assert by_name["blocks.0.attn.qkv.bias"].reason == "bias"


def test_distilled_deit_exempts_both_heads_and_the_distillation_token():
    plan = find_layers(build("deit_tiny_distilled_patch16_224", img_size=32, depth=2))
    by_name = {d.name: d for d in plan.decisions}
    for name in ("dist_token", "head.weight", "head_dist.weight"):
        assert not by_name[name].eligible, name


def test_layer_scale_gammas_and_position_bias_tables_are_exempt():
    convnext = {d.name: d for d in find_layers(build("convnext_atto")).decisions}
    assert not convnext["stages.0.blocks.0.gamma"].eligible
    swin = {d.name: d for d in find_layers(build("swin_tiny_patch4_window7_224")).decisions}
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert not swin[table].eligible
    assert swin["layers.1.downsample.reduction.weight"].eligible


def test_conv_head_after_the_blocks_is_exempt():
    by_name = {d.name: d for d in find_layers(build("efficientnet_b0")).decisions}
    assert by_name["conv_head.weight"].reason == "timm group_matcher: blocks, after the last block"
    assert not by_name["conv_head.weight"].eligible


class FakeTimm(nn.Module):
    """A model with timm's metadata and nothing else from timm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3))
        self.neck = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)
        self.pretrained_cfg = {"first_conv": "stem", "classifier": "fc"}


def test_timm_model_without_group_matcher_falls_back_and_says_so():
    plan = find_layers(FakeTimm())
    by_name = {d.name: d for d in plan.decisions}
    assert plan.detector == "timm metadata"
    assert set(plan.eligible_names) == {"body.0.weight", "body.2.weight", "neck.weight"}
    assert by_name["body.0.weight"].reason.startswith("timm model without group_matcher(); generic")
    assert by_name["stem.weight"].reason == (
        "timm pretrained_cfg['first_conv'] = 'stem' (input stem)"
    )
    assert by_name["fc.weight"].reason == "timm pretrained_cfg['classifier'] = 'fc' (classifier)"


def test_adding_a_family_is_adding_a_row(monkeypatch):
    row = {"stem": r"^stem", "blocks": r"^body\.(\d+)"}
    monkeypatch.setitem(families.TIMM_GROUP_MATCHERS, "FakeTimm", row)
    plan = find_layers(FakeTimm())
    by_name = {d.name: d for d in plan.decisions}
    assert set(plan.eligible_names) == {"body.0.weight", "body.2.weight"}
    assert by_name["body.2.weight"].reason == "family table 'FakeTimm': blocks 2 (Conv2d)"
    assert by_name["neck.weight"].reason == "family table 'FakeTimm': in no group (neck or head)"


class CallableMatcherTimm(FakeTimm):
    def group_matcher(self, coarse=False):
        def _matcher(name):
            if name.startswith("stem"):
                return 0
            if name.startswith("body."):
                return int(name.split(".")[1]) + 1
            return float("inf")

        return _matcher


def test_callable_group_matcher_lowest_group_is_stem_inf_is_head():
    plan = find_layers(CallableMatcherTimm())
    by_name = {d.name: d for d in plan.decisions}
    assert set(plan.eligible_names) == {"body.0.weight", "body.2.weight"}
    assert by_name["stem.bias"].reason == "timm pretrained_cfg['first_conv'] = 'stem' (input stem)"
    assert by_name["neck.weight"].reason == "timm group_matcher: in no group (neck or head)"


def test_include_and_exclude_override_timm_metadata():
    model = build("resnet18")
    plan = find_layers(model, include=["fc.weight"], exclude=["layer4.*"])
    by_name = {d.name: d for d in plan.decisions}
    assert by_name["fc.weight"].eligible
    assert by_name["fc.weight"].reason == "include pattern 'fc.weight'"
    assert not by_name["layer4.0.conv1.weight"].eligible
    assert by_name["layer4.0.conv1.weight"].reason == "exclude pattern 'layer4.*'"
    assert by_name["layer3.0.conv1.weight"].eligible


def test_pattern_matching_nothing_names_the_pattern():
    with pytest.raises(ValueError, match=r"exclude pattern 'blocks\.99\.\*' matches no"):
        find_layers(build("vit_tiny_patch16_224", img_size=32, depth=2), exclude=["blocks.99.*"])


def test_lips_masks_only_the_planned_tensors_of_a_timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.01), LIPSConfig(total_rounds=10))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    lips.optimizer.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = lips.on_global_model(1)
    assert report.tensors_masked == len(lips.plan.eligible) == 8
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in lips.plan.eligible_names), name
