"""The arm is what its label says while it trains, not only when it loads (issue 11, kind 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench import cli
from qbench.cell import lora, models, readback
from qbench.cell.measure import weights
from qbench.contract import precisions
from qbench.contract import suite as spec
from qbench.runner import preflight

from .conftest import write_suite
from .helpers import suites


def llm_text(prepare: str = "peft-kbit", listed=("fp32", "nf4"), checkpointing: bool = False) -> str:
    return suites.causal_lm(
        precisions=listed, name="prep",
        # a 16-bit base that k-bit preparation widens (auto measures float32 on some CPUs)
        settings=f'compute_dtype = "bfloat16"\nbaseline = "{listed[0]}"',
        lora='r = 4\nalpha = 8\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]', steps=2,
        train=f'batch_size = 4\nlr = 1e-3\nmax_length = 32\nuntimed_steps = 1\nprepare = "{prepare}"\n'
              f"gradient_checkpointing = {str(checkpointing).lower()}",
        evaluation="before = false",
    )


def llm_suite(prepare: str = "peft-kbit", listed=("fp32", "nf4"), checkpointing: bool = False) -> spec.Suite:
    return spec.parse(llm_text(prepare, listed, checkpointing))


def loaded_and_prepared(suite: spec.Suite, name: str):
    from transformers import AutoModelForCausalLM

    path = models.resolve("builtin:tiny-llama")
    model = models.load_base(AutoModelForCausalLM, path, precisions.get(name), suite.compute_dtype, "cpu", suite.model)
    at_load = weights.account_base(model)
    return at_load, lora.attach(lora.prepare(model, suite), suite, "CAUSAL_LM", 0)


def test_a_bf16_base_that_k_bit_preparation_turned_float32_fails_naming_modules_and_dtypes():
    suite = llm_suite(listed=("bf16", "nf4"))
    at_load, model = loaded_and_prepared(suite, "bf16")
    fields: dict = {}
    with pytest.raises(weights.FormatMismatch) as raised:
        readback.inspect_trained_base(model, precisions.get("bf16"), suite, fields)
    message = str(raised.value)
    assert 'after the prepare phase (train.prepare = "peft-kbit")' in message and "'bf16'" in message
    assert "model.layers.0.self_attn.q_proj stores torch.float32, expected torch.bfloat16" in message
    # what the base became stays in the record as evidence
    assert fields["weights.prepare.base_bytes"] == 2 * at_load["weights.load.dtype.bfloat16_bytes"] + at_load["weights.load.dtype.float32_bytes"]
    assert fields["weights.prepare.unquantized_param_dtypes"] == "float32" and at_load["weights.load.unquantized_param_dtypes"] == "bfloat16"
    assert fields["weights.prepare.linears.dense_linear_dtypes"] == "float32"


def test_an_nf4_base_keeps_its_codes_and_records_the_norms_and_embeddings_k_bit_preparation_widened():
    suite = llm_suite()
    at_load, model = loaded_and_prepared(suite, "nf4")
    fields: dict = {}
    readback.inspect_trained_base(model, precisions.get("nf4"), suite, fields)  # still NF4: no mismatch
    assert fields["weights.prepare.quantized_codes_bytes"] == at_load["weights.load.quantized_codes_bytes"]
    assert fields["weights.prepare.quant_state_bytes"] == at_load["weights.load.quant_state_bytes"]
    buffers = at_load["weights.load.unquantized.buffer_bytes"]  # rotary inverse frequencies, float32 already
    assert fields["weights.prepare.unquantized_bytes"] == 2 * (at_load["weights.load.unquantized_bytes"] - buffers) + buffers
    assert fields["weights.prepare.dtype.uint8_bytes"] == at_load["weights.load.dtype.uint8_bytes"]
    assert "weights.prepare.dtype.bfloat16_bytes" not in fields
    assert fields["weights.prepare.linears.linear4bit_count"] > 0
    assert fields["weights.prepare.linears.quant_types"] == "nf4"
    assert sum(v for k, v in fields.items() if k.startswith("weights.prepare.dtype.")) == fields["weights.prepare.base_bytes"]


def test_without_preparation_the_trained_base_is_the_loaded_one_and_lora_is_not_counted_in_it():
    suite = llm_suite(prepare="none", listed=("bf16", "nf4"), checkpointing=True)
    for name in ("bf16", "nf4"):
        at_load, model = loaded_and_prepared(suite, name)
        fields: dict = {}
        readback.inspect_trained_base(model, precisions.get(name), suite, fields)
        shared = [k for k in at_load if not k.startswith("weights.load.bits_per") and k != "weights.load.unquantized_share_of_bytes"]
        assert {k: fields[k.replace("weights.load.", "weights.prepare.", 1)] for k in shared} == {k: at_load[k] for k in shared}
        assert any(".lora_A." in n for n, _ in model.named_modules())


def test_k_bit_preparation_with_a_16_bit_dense_arm_is_refused_before_any_cell(tmp_path: Path, capsys, no_cell):
    text = llm_text(listed=("bf16", "nf4"))
    suite_path = write_suite(tmp_path, text)
    code = cli.main(["run", str(suite_path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    error = capsys.readouterr().err
    assert "train.prepare" in error and "bf16" in error and "float32" in error
    assert not (tmp_path / "out").exists()
    fp32 = spec.LoadedSuite(llm_suite(listed=("fp32", "nf4")), suite_path, "x")
    assert preflight.preparation_problems(fp32) == []  # an fp32 arm stays fp32 under the preparation
    fp16 = spec.LoadedSuite(llm_suite(listed=("fp32", "fp16", "nf4")), suite_path, "x")
    assert "fp16" in preflight.preparation_problems(fp16)[0]
