import pytest
import torch

from qbench.cell.models import quantization_config, storage_dtype
from qbench.contract import precisions


def test_default_matrix_names_are_all_registered():
    assert set(precisions.DEFAULT_MATRIX) <= set(precisions.REGISTRY)


def test_dense_precisions_build_no_quantization_config():
    bf16 = precisions.get("bf16")
    assert quantization_config(bf16, "bfloat16") is None
    assert storage_dtype(bf16, "float32") == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "quant_type", "double_quant"),
    [("nf4", "nf4", False), ("nf4-dq", "nf4", True), ("fp4", "fp4", False), ("fp4-dq", "fp4", True)],
)
def test_four_bit_configs_carry_type_double_quant_and_compute_dtype(name, quant_type, double_quant):
    config = quantization_config(precisions.get(name), "bfloat16")
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == quant_type
    assert config.bnb_4bit_use_double_quant is double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_int8_config_uses_llm_int8_threshold_six():
    config = quantization_config(precisions.get("int8"), "bfloat16")
    assert config.load_in_8bit and not config.load_in_4bit
    assert config.llm_int8_threshold == 6.0


def test_quantized_precisions_store_unquantized_parts_in_compute_dtype():
    assert storage_dtype(precisions.get("nf4"), "float32") == torch.float32


def test_unknown_precision_names_the_known_ones():
    with pytest.raises(KeyError, match="nf4-dq"):
        precisions.get("nf3")
