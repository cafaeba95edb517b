"""bitsandbytes' CPU weight packing must not corrupt gradients when evaluation precedes training."""

import pytest
import torch

from qbench.cell.models import disable_bnb_cpu_weight_packing

bnb = pytest.importorskip("bitsandbytes")


def four_bit_layer(source: torch.nn.Linear, quant_type: str) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(
        source.in_features, source.out_features, bias=source.bias is not None,
        compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=True,
    )
    layer.load_state_dict(source.state_dict())
    return layer.to("cpu")  # quantizes


def input_gradient(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.train()
    x = x.clone().requires_grad_(True)
    layer(x).float().pow(2).sum().backward()
    return x.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_input_gradients_after_an_eval_pass_equal_those_of_a_fresh_layer(quant_type, bias):
    torch.manual_seed(0)
    source = torch.nn.Linear(128, 64, bias=bias)
    x = torch.randn(4, 128, dtype=torch.bfloat16)

    fresh = four_bit_layer(source, quant_type)
    expected = input_gradient(fresh, x)

    evaluated = four_bit_layer(source, quant_type)
    assert disable_bnb_cpu_weight_packing(torch.nn.Sequential(evaluated)) == 1
    evaluated.eval()
    with torch.no_grad():
        evaluated(x)  # the pass that, left alone, repacks the weight for CPU inference
    assert not getattr(evaluated.weight.quant_state, "packing_format_for_cpu", False)
    got = input_gradient(evaluated, x)

    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected)
