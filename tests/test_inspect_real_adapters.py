"""`inspect --base` on what real adapters showed: PEFT's own count, and targets that match nothing.

The "PEFT would print" line must equal `print_trainable_parameters` of the PeftModel the adapter was trained
as (compared exactly, as strings, on tiny models built here):
- Gemma-4 saves persistent buffers (`layer_scalar`) in its checkpoint; they are not parameters.
- An adapter trained on a bare model (LlamaModel) does not count the causal-LM head its base checkpoint has.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.inspect import inspect_ref, unmatched_targets
from tests.builders import save_base, tiny_llama, tiny_llama_config

LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


def _peft_line(peft_model) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        peft_model.print_trainable_parameters()
    return buffer.getvalue().strip()


def _tiny_gemma4():
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=64, layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma4ForCausalLM(config)


def test_persistent_buffers_are_not_parameters(tmp_path: Path) -> None:
    base = _tiny_gemma4()
    buffers = set(base.state_dict()) - {n for n, _ in base.named_parameters(remove_duplicate=False)}
    assert any("layer_scalar" in n for n in buffers)  # the case this test is about
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(_tiny_gemma4(), LORA)
    peft_model.save_pretrained(tmp_path / "lora")
    report = inspect_ref(tmp_path / "lora", base=tmp_path / "base")
    assert report.fit.peft_line == _peft_line(peft_model)


def test_adapter_trained_on_a_bare_model_does_not_count_the_head(tmp_path: Path) -> None:
    from transformers import LlamaModel

    full = tiny_llama()
    save_base(full, tmp_path / "base")  # a LlamaForCausalLM checkpoint: model.* and lm_head.weight
    bare = LlamaModel(tiny_llama_config())
    bare.load_state_dict({k.removeprefix("model."): v for k, v in full.state_dict().items() if k != "lm_head.weight"})
    peft_model = get_peft_model(bare, LORA)
    peft_model.save_pretrained(tmp_path / "lora")
    report = inspect_ref(tmp_path / "lora", base=tmp_path / "base")
    assert report.fit.peft_line == _peft_line(peft_model)
    # The same adapter trained on the head model counts the head: the two lines differ by lm_head's size.
    head_model = get_peft_model(tiny_llama(), LORA)
    head_model.save_pretrained(tmp_path / "lora-head")
    on_head = inspect_ref(tmp_path / "lora-head", base=tmp_path / "base")
    assert on_head.fit.peft_line == _peft_line(head_model)
    assert on_head.fit.all_params - report.fit.all_params == full.lm_head.weight.numel()


def test_unmatched_target_modules_are_warned(tmp_path: Path) -> None:
    """A Phi-1.5-style config (`Wqkv`, `out_proj`, `fc1`, `fc2`) on a base whose attention says q_proj...:
    only fc1/fc2-like names adapt; the others are named in a warning, on the CLI too."""
    names = {f"model.layers.0.mlp.{m}.weight": None for m in ("fc1", "fc2")}
    names |= {f"model.layers.0.self_attn.{m}.weight": None for m in ("q_proj", "dense")}
    warnings = unmatched_targets(["Wqkv", "out_proj", "fc1", "fc2"], names)
    assert len(warnings) == 1 and "'Wqkv', 'out_proj'" in warnings[0] and "fc1" not in warnings[0]
    assert unmatched_targets(["fc1", "q_proj"], names) == []
    assert unmatched_targets(r".*\.(fc1|fc2)", names) == []
    assert unmatched_targets(r".*\.Wqkv", names) != []
    assert unmatched_targets("all-linear", names) == []

    save_base(tiny_llama(), tmp_path / "base")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "Wqkv"])
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "lora")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "lora"), "--base", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "'Wqkv'" in result.stderr


@pytest.mark.parametrize("columns", [80, 100])
def test_inspect_table_fits_the_terminal(tmp_path: Path, columns: int) -> None:
    """At 80 (and 100) columns with --base: no line is wider, kind and rank are filled, no header is cut."""
    save_base(tiny_llama(), tmp_path / "base")
    get_peft_model(tiny_llama(), LORA).save_pretrained(tmp_path / "lora")
    env = {"COLUMNS": str(columns)}
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "lora"), "--base", str(tmp_path / "base")], env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    start = next(i for i, line in enumerate(lines) if line.startswith("modules"))
    header = lines[start + 2]
    for column in ("tensor", "kind", "rank", "|delta|_F"):
        assert column in header, header
    assert "…" not in header and "..." not in header
    # Each module's first line (its name may wrap onto the next) carries its kind and rank.
    rows = [line for line in lines[start + 4 :] if "model.layers." in line]
    assert len(rows) == 4 and all(" lora " in row and " 2 " in row for row in rows), rows
    wide = CliRunner().invoke(
        app, ["inspect", str(tmp_path / "lora"), "--base", str(tmp_path / "base"), "--wide"], env=env
    )
    assert wide.exit_code == 0 and "amplification" in wide.stdout
