import pytest
import torch
from conftest import MIDDLE, SmallCNN
from torch import nn

from lips_wrap import find_layers


def test_generic_rule_on_a_cnn(cnn):
    plan = find_layers(cnn)
    assert plan.eligible_names == MIDDLE
    reasons = {d.name: d.reason for d in plan.decisions}
    assert reasons["stem.weight"] == "input stem: first layer (Conv2d)"
    assert reasons["head.weight"] == "head: last layer (Linear)"
    assert reasons["conv1.bias"] == "bias"
    assert reasons["bn1.weight"] == "normalisation (BatchNorm2d)"
    assert reasons["conv1.weight"] == "middle layer weight (Conv2d)"
    assert plan.masked_numel == sum(p.numel() for n, p in cnn.named_parameters() if n in MIDDLE)
    assert plan.total_numel == sum(p.numel() for p in cnn.parameters())


def test_table_lists_every_tensor_with_totals(cnn):
    table = find_layers(cnn).table()
    for name, _ in cnn.named_parameters():
        assert name in table
    assert "3 of 12 tensors eligible" in table.splitlines()[-1]


def test_embeddings_norms_and_odd_parameters_exempt():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.pos = nn.Parameter(torch.zeros(3, 4))
            self.inp = nn.Linear(4, 4)
            self.attn = nn.MultiheadAttention(4, 2)
            self.norm = nn.LayerNorm(4)
            self.out = nn.Linear(4, 2)

    plan = find_layers(Model())
    assert plan.eligible_names == ("attn.in_proj_weight", "attn.out_proj.weight")
    reasons = {d.name: d.reason for d in plan.decisions}
    assert reasons["embed.weight"] == "embedding (Embedding)"
    assert reasons["pos"] == "not a layer weight (Model.pos)"
    assert reasons["norm.weight"] == "normalisation (LayerNorm)"
    assert reasons["attn.in_proj_bias"] == "bias"


def test_include_and_exclude_override_detection(cnn):
    plan = find_layers(cnn, include=["head.weight"], exclude=["conv1.*"])
    assert plan.eligible_names == ("conv2.weight", "fc.weight", "head.weight")
    reasons = {d.name: d.reason for d in plan.decisions}
    assert reasons["conv1.weight"] == "exclude pattern 'conv1.*'"
    assert reasons["head.weight"] == "include pattern 'head.weight'"


def test_exclude_wins_over_include(cnn):
    plan = find_layers(cnn, include=["fc.weight"], exclude=["fc.*"])
    assert "fc.weight" not in plan.eligible_names


def test_pattern_matching_nothing_is_an_error(cnn):
    with pytest.raises(ValueError, match="include pattern 'blocks.*' matches no parameter name"):
        find_layers(cnn, include=["blocks.*"])
    with pytest.raises(ValueError, match="exclude pattern 'nope' matches no parameter name"):
        find_layers(cnn, exclude=["nope"])


def test_nothing_eligible_is_an_error():
    with pytest.raises(ValueError, match="no eligible layer found in Sequential"):
        find_layers(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    plan = find_layers(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), allow_empty=True)
    assert plan.eligible == ()


def test_frozen_layers_exempt():
    model = SmallCNN()
    model.conv1.weight.requires_grad_(False)
    plan = find_layers(model)
    assert "conv1.weight" not in plan.eligible_names
    reasons = {d.name: d.reason for d in plan.decisions}
    assert reasons["conv1.weight"] == "frozen (requires_grad=False)"


def test_tied_weights_decided_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.c.weight = self.b.weight            # shared between two middle layers
            self.lm_head.weight = self.embed.weight  # output tied to the input embedding

    plan = find_layers(Tied())
    by_name = {d.name: d for d in plan.decisions}
    assert plan.eligible_names == ("b.weight",)
    assert by_name["b.weight"].aliases == ("c.weight",)
    assert "c.weight" not in by_name  # listed once, under its first name
    assert not by_name["embed.weight"].eligible
    assert by_name["embed.weight"].aliases == ("lm_head.weight",)


def test_tied_with_an_exempt_name_is_exempt():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.middle = nn.Linear(4, 4)
            self.head = nn.Linear(4, 4)
            self.head.weight = self.middle.weight

    by_name = {d.name: d for d in find_layers(Tied(), allow_empty=True).decisions}
    assert not by_name["middle.weight"].eligible
    expected = "tied with exempt head.weight (head: last layer (Linear))"
    assert by_name["middle.weight"].reason == expected


def test_include_of_non_float_tensor_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model.register_parameter("steps", nn.Parameter(torch.zeros(2, dtype=torch.long),
                                                   requires_grad=False))
    with pytest.raises(ValueError, match="include pattern 'steps' selects steps, a torch.int64"):
        find_layers(model, include=["steps"])


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        find_layers({})
