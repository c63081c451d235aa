"""Mixture-of-experts models: every expert of a fused ``[experts, out, in]`` tensor is
ranked as a layer of its own (client and server side), routing gates are exempt."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lips_wrap import LIPS, LIPSConfig, find_layers, mask_global_state
from lips_wrap.__main__ import plan_to_dict
from lips_wrap.masking import keep_count, mask_by_score_
from lips_wrap.selection import SMALL, select_top_k_slices, selection_mask, split_slices


def sorted_keep(score: torch.Tensor, k: int) -> torch.Tensor:
    """Reference by full sort: the k largest, ties to the lowest flat index."""
    flat = score.reshape(-1).to(torch.float64)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(-flat, stable=True)[:k]] = True
    return keep.reshape(score.shape)


def per_slice_reference(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([sorted_keep(part, k) for part in score])


def selections_mask(score: torch.Tensor, selections) -> torch.Tensor:
    return torch.stack([selection_mask(part, sel) for part, sel in zip(score, selections)])


# -- numerics ----------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(slices=st.integers(1, 6), rows=st.integers(1, 5), cols=st.integers(1, 6),
       levels=st.integers(1, 5), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_batched_selection_keeps_k_per_slice_as_a_full_sort_would(
    slices, rows, cols, levels, data, dtype
):
    seed = data.draw(st.integers(0, 2**16))
    score = torch.randint(0, levels, (slices, rows, cols),
                          generator=torch.Generator().manual_seed(seed)).to(dtype)  # ties
    k = data.draw(st.integers(0, rows * cols))
    selections = select_top_k_slices(score, slices, k)
    assert len(selections) == slices
    mask = selections_mask(score, selections)
    assert mask.flatten(1).sum(dim=1).tolist() == [k] * slices
    assert torch.equal(mask, per_slice_reference(score, k))


def test_large_slices_take_the_sample_select_path_and_stay_exact():
    generator = torch.Generator().manual_seed(3)
    score = torch.randint(0, 50, (3, SMALL + 100), generator=generator).float()
    score[1] = 0.0  # one slice entirely tied
    k = 4000
    mask = selections_mask(score, select_top_k_slices(score, 3, k))
    assert mask.sum(dim=1).tolist() == [k, k, k]
    assert torch.equal(mask, per_slice_reference(score, k))


def test_bad_slicing_is_named():
    with pytest.raises(ValueError, match=r"shape \(6, 2\) cannot be cut into 4 equal slices"):
        split_slices(torch.zeros(6, 2), 4, "w")
    with pytest.raises(ValueError, match="slices must be a positive integer"):
        select_top_k_slices(torch.zeros(4, 2), 0, 1)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 2\] for each slice"):
        select_top_k_slices(torch.zeros(4, 2), 4, 3)
    with pytest.raises(ValueError, match="slices must be a positive integer dividing numel=10"):
        keep_count(10, 0.5, 3)
    large = torch.ones(2, 2 * SMALL)
    large[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"w \(slice 1\) holds 1 NaN"):
        select_top_k_slices(large, 2, 3, "w")
    with pytest.raises(ValueError, match=r"^w holds 1 NaN"):
        select_top_k_slices(torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]), 2, 1, "w")


def test_keep_count_per_slice():
    assert keep_count(4 * 30, 0.5, 4) == 4 * 15
    assert keep_count(5 * 9, 0.3, 5) == 5 * int(0.3 * 9) == 10  # whole: int(0.3 * 45) == 13
    assert keep_count(5 * 9, 0.3) == 13


@pytest.mark.parametrize("kind", ["sensitivity", "magnitude", "low_magnitude", "random"])
def test_mask_by_score_per_slice_equals_masking_each_expert_alone(kind):
    torch.manual_seed(0)
    weight = torch.randn(4, 6, 5)
    weight[0] *= 1e-3  # a cold expert: ranked jointly it would lose every entry
    grad = torch.randn(4, 6, 5)
    state = torch.randn(4, 6, 5)
    reference = torch.randn(4, 6, 5)
    fused = [weight.clone(), state.clone()]
    mask_by_score_(fused, fused[0].clone(), grad, 0.45, kind, name="w", slices=4,
                   reference=reference)
    for expert in range(4):
        kept = fused[0][expert] != reference[expert]
        assert int(kept.sum()) == int(0.45 * 30) == 13
        assert torch.equal(fused[1][expert][~kept], torch.zeros(30 - 13))
        assert torch.equal(fused[1][expert][kept], state[expert][kept])
        if kind == "random":  # drawn once for the whole tensor: differs from a draw alone
            continue
        alone = [weight[expert].clone(), state[expert].clone()]
        mask_by_score_(alone, alone[0].clone(), grad[expert], 0.45, kind, name="w",
                       reference=reference[expert])
        assert torch.equal(fused[0][expert], alone[0])
        assert torch.equal(fused[1][expert], alone[1])


def test_mask_by_score_per_slice_on_a_non_contiguous_tensor():
    base = torch.randn(5, 6, 4)
    weight = base.transpose(0, 1)[:4]  # [4, 5, 4] view with odd strides
    expected = weight.clone()
    mask_by_score_([expected], expected.clone(), None, 0.5, "magnitude", slices=4)
    mask_by_score_([weight], weight.clone(), None, 0.5, "magnitude", slices=4)
    assert torch.equal(weight, expected)  # written through the view
    assert (base.transpose(0, 1)[:4] != 0).flatten(1).sum(dim=1).tolist() == [10] * 4


# -- plain torch mixture of experts --------------------------------------------------------
class TinyMoE(nn.Module):
    """A block whose experts are unfused ``Linear`` layers, beside a gated fusion layer
    named ``gate`` outside any MoE block (an ordinary layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.gate = nn.Linear(8, 8)
        self.moe = nn.Module()
        self.moe.router = nn.Linear(8, 3)
        self.moe.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)


def test_plain_torch_router_is_exempt_and_a_gate_outside_moe_blocks_is_not():
    plan = {d.name: d for d in find_layers(TinyMoE()).decisions}
    assert not plan["moe.router.weight"].eligible
    assert plan["moe.router.weight"].reason.startswith(
        "routing gate of the mixture-of-experts block moe (Module)")
    assert plan["gate.weight"].eligible
    assert all(plan[f"moe.experts.{i}.weight"].eligible for i in range(3))
    assert all(d.slices == 1 for d in plan.values())


# -- Hugging Face families ------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

EXPERTS = 4
TINY = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 32}


def mixtral() -> nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=EXPERTS,
        num_experts_per_tok=2, **TINY))


def qwen2_moe() -> nn.Module:
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=8,
        shared_expert_intermediate_size=16, num_experts=EXPERTS, num_experts_per_tok=2, **TINY))


def jetmoe() -> nn.Module:
    return transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        num_key_value_heads=2, kv_channels=8, num_local_experts=EXPERTS,
        num_experts_per_tok=2, **TINY))


FAMILIES = {
    # builder, fused expert tensors of each layer, routing gates of each layer
    "mixtral": (mixtral, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                ["mlp.gate.weight"]),
    "qwen2_moe": (qwen2_moe, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                  ["mlp.gate.weight", "mlp.shared_expert_gate.weight"]),
    "jetmoe": (jetmoe, ["mlp.input_linear.weight", "mlp.output_linear.weight",
                        "self_attention.experts.input_linear.weight",
                        "self_attention.experts.output_linear.weight"],
               ["mlp.router.layer.weight", "self_attention.experts.router.layer.weight"]),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    build, fused, gates = FAMILIES[request.param]
    model = build()
    layers = [f"model.layers.{index}." for index in range(TINY["num_hidden_layers"])]
    return model, [p + n for p in layers for n in fused], [p + n for p in layers for n in gates]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_plan_ranks_fused_experts_per_expert_and_exempts_gates(family):
    model, fused, gates = family
    plan = find_layers(model)
    decisions = {d.name: d for d in plan.decisions}
    for name in fused:
        decision = decisions[name]
        assert decision.eligible and decision.slices == EXPERTS
        shape = "x".join(map(str, decision.shape[1:]))
        assert decision.why.endswith(f"; per expert, {EXPERTS} x {shape}")
        assert f"per expert, {EXPERTS} x {shape}" in plan.table()
    for name in gates:
        assert not decisions[name].eligible
        assert decisions[name].reason.startswith("routing gate of the mixture-of-experts block")
    assert all(d.slices == 1 for d in plan.decisions if d.name not in fused)
    rows = {row["name"]: row for row in plan_to_dict(plan)["tensors"]}
    assert rows[fused[0]]["slices"] == EXPERTS and rows[gates[0]]["slices"] == 1


def test_qwen2_moe_shared_expert_is_masked_as_a_layer_but_its_gate_is_not():
    torch.manual_seed(0)
    decisions = {d.name: d for d in find_layers(qwen2_moe()).decisions}
    assert decisions["model.layers.1.mlp.shared_expert.up_proj.weight"].eligible
    assert not decisions["model.layers.1.mlp.shared_expert_gate.weight"].eligible


def test_client_masks_each_expert_exactly_with_its_optimizer_state(family):
    model, fused, gates = family
    lips = LIPS(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                LIPSConfig(10, grad_dtype=torch.float32))
    train_step(model, lips.optimizer)
    with torch.no_grad():  # one cold expert, as a rarely routed one
        for name in fused:
            model.get_parameter(name)[1] *= 1e-4
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: lips.optimizer.captured_grad(model.get_parameter(name)).float()
             for name in fused}
    report = lips.on_global_model(1)
    density = report.density
    for name in fused:
        weight = model.get_parameter(name)
        per_expert = weight[0].numel()
        score = (before[name] * grads[name]).abs()
        expected = per_slice_reference(score, int(density * per_expert))
        assert torch.equal(weight != 0, expected), name
        assert (weight != 0).flatten(1).sum(dim=1).tolist() == [
            int(density * per_expert)] * EXPERTS
        for state in lips.optimizer.state_tensors(weight):
            assert torch.equal(state[~expected], torch.zeros_like(state[~expected]))
    for name in gates:
        assert torch.equal(model.get_parameter(name), before[name])
        assert (model.get_parameter(name) != 0).all()
    assert report.elements_zeroed == sum(
        d.numel - keep_count(d.numel, density, d.slices) for d in lips.plan.eligible)


def test_server_masks_each_expert_exactly_and_returns_gates_untouched(family):
    model, fused, gates = family
    plan = find_layers(model)
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = model.state_dict()
    config = LIPSConfig(10, start_density=0.3)
    masked, report = mask_global_state(state, previous, plan, 1, config)
    for name in fused:
        per_expert = state[name][0].numel()
        score = ((state[name] - previous[name]) * state[name]).abs()
        expected = per_slice_reference(score, int(0.3 * per_expert))
        assert torch.equal(masked[name] != 0, expected), name
        assert torch.equal(masked[name][expected], state[name][expected])
    for name in gates:
        assert masked[name] is state[name]
    assert report.elements_zeroed == sum(
        d.numel - keep_count(d.numel, 0.3, d.slices) for d in plan.eligible)


class UnfusedExperts(nn.Module):
    """Mixtral's experts as one ``Linear`` pair per expert (the form of the checkpoints
    before transformers fused them), holding the same weights."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        self.gate_up = nn.ModuleList()
        self.down = nn.ModuleList()
        for expert in range(fused.gate_up_proj.shape[0]):
            for linears, weight in ((self.gate_up, fused.gate_up_proj[expert]),
                                    (self.down, fused.down_proj[expert])):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight.data.copy_(weight)
                linears.append(linear)


@pytest.mark.parametrize("score", ["sensitivity", "magnitude"])
def test_fused_and_unfused_experts_get_the_same_masks(score):
    torch.manual_seed(0)
    fused_model = mixtral()
    unfused_model = mixtral()
    unfused_model.load_state_dict(fused_model.state_dict())
    for layer in unfused_model.model.layers:
        layer.mlp.experts = UnfusedExperts(layer.mlp.experts)
    config = LIPSConfig(10, score=score)
    fused = LIPS(fused_model, torch.optim.SGD(fused_model.parameters(), lr=0.1), config)
    unfused = LIPS(unfused_model, torch.optim.SGD(unfused_model.parameters(), lr=0.1), config)
    generator = torch.Generator().manual_seed(1)
    fused_grads, unfused_grads = {}, {}
    for name in fused.plan.eligible_names:
        grad = torch.randn(fused_model.get_parameter(name).shape, generator=generator)
        fused_grads[name] = grad
        if ".experts." not in name:
            unfused_grads[name] = grad
            continue
        prefix, kind = name.rsplit(".", 1)
        short = "gate_up" if kind == "gate_up_proj" else "down"
        for expert in range(EXPERTS):
            unfused_grads[f"{prefix}.{short}.{expert}.weight"] = grad[expert]
    fused.load_state_dict({"version": 1, "last_round": None, "grads": fused_grads})
    unfused.load_state_dict({"version": 1, "last_round": None, "grads": unfused_grads})
    fused.on_global_model(1)
    unfused.on_global_model(1)
    for index, layer in enumerate(fused_model.model.layers):
        twin = unfused_model.model.layers[index].mlp.experts
        for expert in range(EXPERTS):
            assert torch.equal(layer.mlp.experts.gate_up_proj[expert],
                               twin.gate_up[expert].weight)
            assert torch.equal(layer.mlp.experts.down_proj[expert], twin.down[expert].weight)


def dbrx() -> nn.Module:
    return transformers.DbrxForCausalLM(transformers.DbrxConfig(
        d_model=16, n_heads=2, n_layers=2, max_seq_len=32, vocab_size=64,
        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 8, "moe_num_experts": EXPERTS, "moe_top_k": 2}))


def test_dbrx_row_stacked_experts_are_layers_ranked_per_expert():
    # DBRX keeps each projection of all experts as one 2-d [experts * ffn, hidden] tensor
    torch.manual_seed(0)
    model = dbrx()
    plan = find_layers(model)
    decisions = {d.name: d for d in plan.decisions}
    block = "transformer.blocks.0.ffn."
    for local in ("w1", "v1", "w2"):
        decision = decisions[f"{block}experts.mlp.{local}"]
        assert decision.eligible and decision.slices == EXPERTS
        assert decision.why.endswith(f"; per expert, {EXPERTS} x 16")
    assert not decisions[f"{block}router.layer.weight"].eligible
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masked, _ = mask_global_state(state, None, plan, 1, LIPSConfig(10))
    for local in ("w1", "v1", "w2"):
        rows = masked[f"{block}experts.mlp.{local}"].view(EXPERTS, -1)
        assert (rows != 0).sum(dim=1).tolist() == [int(0.5 * 8 * 16)] * EXPERTS
        expected = per_slice_reference(state[f"{block}experts.mlp.{local}"].abs()
                                       .view(EXPERTS, -1), int(0.5 * 8 * 16))
        assert torch.equal(rows != 0, expected)
    assert masked[f"{block}router.layer.weight"] is state[f"{block}router.layer.weight"]


def test_a_wrong_expert_count_is_a_warning_and_the_tensor_is_ranked_whole():
    torch.manual_seed(0)
    model = dbrx()
    model.transformer.blocks[0].ffn.experts.mlp.moe_num_experts = 3  # 32 rows: no
    with pytest.warns(UserWarning) as caught:
        plan = find_layers(model)
    assert [str(w.message).split(" (")[0] for w in caught] == [
        f"transformer.blocks.0.ffn.experts.mlp.{local}" for local in ("w1", "v1", "w2")]
    assert "(DbrxExpertGLU.w1) of shape (32, 16) stacks experts along dim 0, but " \
           "DbrxExpertGLU.moe_num_experts = 3 is no number" in str(caught[0].message)
    assert "ranks it as one tensor, not per expert" in str(caught[0].message)
    decisions = {d.name: d for d in plan.decisions}
    assert decisions["transformer.blocks.0.ffn.experts.mlp.w1"].slices == 1
    assert decisions["transformer.blocks.1.ffn.experts.mlp.w1"].slices == EXPERTS
