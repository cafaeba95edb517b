"""Weight bytes of the loaded base are exact: recomputed here from layer shapes alone."""

import math
from types import SimpleNamespace

import pytest
import torch

from qbench.cell import models
from qbench.cell.measure import weights
from qbench.contract import precisions

SPEC = SimpleNamespace(revision=None, device_map="single", safetensors_only=True, trust_remote_code=False)


def load(path: str, name: str):
    from transformers import CLIPModel

    return models.load_base(CLIPModel, path, precisions.get(name), "bfloat16", "cpu", SPEC)


def linear_shapes(model) -> dict[str, tuple[int, int, bool]]:
    """(out, in, has_bias) of every quantized linear, read from the unquantized model."""
    return {
        name: (m.out_features, m.in_features, m.bias is not None)
        for name, m in model.named_modules()
        if weights.is_bnb_linear(m)
    }


def expected_quantized_bytes(out_features: int, in_features: int, precision: precisions.Precision) -> int:
    values = out_features * in_features
    if precision.kind == "int8":
        return values + 4 * out_features  # int8 codes + one float32 scale per row
    blocks = math.ceil(values / 64)
    codes = math.ceil(values / 2)
    code_table = 16 * 4  # the 16-entry float32 NF4/FP4 table each layer keeps
    if not precision.double_quant:
        return codes + 4 * blocks + code_table  # float32 absmax per 64 values
    nested_blocks = math.ceil(blocks / 256)
    # 8-bit absmax per 64 values + float32 absmax per 256 blocks + 256-entry float32 code table + float32 offset
    return codes + blocks + 4 * nested_blocks + 256 * 4 + code_table + 4


@pytest.fixture(scope="module")
def bf16_bytes(tiny_clip_path):
    model = load(tiny_clip_path, "bf16")
    return weights.account_base(model)["weights.load.base_bytes"], {n: m for n, m in model.named_modules()}


@pytest.mark.parametrize("name", ["int8", "fp4", "fp4-dq", "nf4", "nf4-dq"])
def test_quantized_base_bytes_match_the_analytic_count_to_the_byte(tiny_clip_path, bf16_bytes, name):
    precision = precisions.get(name)
    dense_total, dense_modules = bf16_bytes
    model = load(tiny_clip_path, name)
    shapes = linear_shapes(model)
    assert shapes, "no quantized linear found"
    expected_quantized = sum(expected_quantized_bytes(o, i, precision) for o, i, _ in shapes.values())
    # what stays unquantized is the bf16 model minus the bf16 weights of the linears that got quantized
    expected_unquantized = dense_total - sum(dense_modules[n].weight.nbytes for n in shapes)
    account = weights.account_base(model)
    assert account["weights.load.quantized_codes_bytes"] + account["weights.load.quant_state_bytes"] == expected_quantized
    assert account["weights.load.unquantized_bytes"] == expected_unquantized
    assert account["weights.load.base_bytes"] == expected_quantized + expected_unquantized
    assert account["weights.load.quantized_params"] == sum(o * i for o, i, _ in shapes.values())


def test_weight_bytes_are_ordered_nf4_dq_nf4_int8_bf16(tiny_clip_path, bf16_bytes):
    sizes = {name: weights.account_base(load(tiny_clip_path, name))["weights.load.base_bytes"] for name in ("nf4-dq", "nf4", "int8")}
    assert sizes["nf4-dq"] < sizes["nf4"] < sizes["int8"] < bf16_bytes[0]


def test_tied_tensors_are_counted_once():
    layer = torch.nn.Linear(8, 8, bias=False)
    model = torch.nn.ModuleDict({"a": layer, "b": torch.nn.Linear(8, 8, bias=False)})
    model["b"].weight = layer.weight
    assert weights.account_base(model)["weights.load.base_bytes"] == 8 * 8 * 4


def test_format_readback_matches_the_precision(tiny_clip_path):
    model = load(tiny_clip_path, "fp4-dq")
    found = weights.read_format(model)
    assert found["weights.load.linears.linear4bit_count"] > 0
    assert found["weights.load.linears.quant_types"] == "fp4"
    assert found["weights.load.linears.compressed_statistics"] == "true"
    assert found["weights.load.linears.blocksizes"] == "64"
    weights.check_format(model, precisions.get("fp4-dq"))


def test_a_base_loaded_without_its_4bit_settings_fails_the_check_naming_the_modules(tiny_clip_path):
    dense = load(tiny_clip_path, "bf16")
    with pytest.raises(weights.FormatMismatch, match=r"self_attn\.q_proj is Linear, expected Linear4bit"):
        weights.check_format(dense, precisions.get("nf4"))
    nf4 = load(tiny_clip_path, "nf4")
    with pytest.raises(weights.FormatMismatch, match=r"q_proj has double quantization off, expected on"):
        weights.check_format(nf4, precisions.get("nf4-dq"))
    with pytest.raises(weights.FormatMismatch, match=r"is Linear4bit, expected a dense Linear"):
        weights.check_format(nf4, precisions.get("bf16"))
