"""Microbenchmarks of the bitsandbytes kernels every qbench cell depends on (pytest-benchmark).

Run through tox (`tox -e bench`), which saves each run under .benchmarks/ and fails when a kernel's
median got slower than the last saved run by more than the tolerance; see docs/benchmarks.md.
Each benchmark also checks its result, so a fast but wrong kernel does not pass.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes import functional as F  # noqa: E402

from qbench.cell.models import disable_bnb_cpu_weight_packing  # noqa: E402
from qbench.contract.precisions import BNB_4BIT_BLOCKSIZE, LLM_INT8_THRESHOLD  # noqa: E402

# big enough that the kernels, not Python overhead, dominate; small enough for a 2-core CI machine
OUT_FEATURES, IN_FEATURES, TOKENS = 1024, 1024, 256
DTYPE = torch.bfloat16
FOUR_BIT = [pytest.param(q, dq, id=f"{q}{'-dq' if dq else ''}") for q in ("nf4", "fp4") for dq in (False, True)]


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(0)).to(DTYPE) * 0.02


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(TOKENS, IN_FEATURES, generator=torch.Generator().manual_seed(1)).to(DTYPE)


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approximation.float() - exact.float()).abs().mean() / exact.float().abs().mean()).item()


@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_quantize_4bit(benchmark, weight, quant_type, double_quant):
    benchmark.group = "quantize 4-bit"
    codes, state = benchmark(F.quantize_4bit, weight, blocksize=BNB_4BIT_BLOCKSIZE,
                             compress_statistics=double_quant, quant_type=quant_type)
    assert codes.numel() == weight.numel() // 2  # two 4-bit codes per byte
    assert bool(state.nested) == double_quant


@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_dequantize_4bit(benchmark, weight, quant_type, double_quant):
    benchmark.group = "dequantize 4-bit"
    codes, state = F.quantize_4bit(weight, blocksize=BNB_4BIT_BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type)
    restored = benchmark(F.dequantize_4bit, codes, state)
    assert restored.shape == weight.shape
    assert relative_error(restored, weight) < 0.15  # 4-bit codes with per-block scales: roughly 10 % error


def _forward_backward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What LoRA training asks of a frozen base layer: an output, and the gradient w.r.t. its input."""
    x = x.detach().requires_grad_(True)
    layer(x).float().square().mean().backward()
    return x.grad


def _dense(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False, dtype=DTYPE)
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    return layer


def test_linear_bf16_forward_backward(benchmark, weight, inputs):
    benchmark.group = "linear forward+backward"
    grad = benchmark(_forward_backward, _dense(weight), inputs)
    assert grad.shape == inputs.shape and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_linear4bit_forward_backward(benchmark, weight, inputs, quant_type, double_quant):
    benchmark.group = "linear forward+backward"
    layer = bnb.nn.Linear4bit(IN_FEATURES, OUT_FEATURES, bias=False, compute_dtype=DTYPE,
                              quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, blocksize=BNB_4BIT_BLOCKSIZE)
    layer = layer.to("cpu")
    disable_bnb_cpu_weight_packing(layer)
    grad = benchmark(_forward_backward, layer, inputs)
    assert relative_error(grad, _forward_backward(_dense(weight), inputs)) < 0.3


def test_linear8bitlt_forward_backward(benchmark, weight, inputs):
    benchmark.group = "linear forward+backward"
    layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, bias=False, has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.int8
    grad = benchmark(_forward_backward, layer, inputs)
    assert relative_error(grad, _forward_backward(_dense(weight), inputs)) < 0.1
