"""Kernel paths are in the record: the machine's (torch's BLAS and oneDNN, bitsandbytes' native library, its int8
matmul, its fused 4-bit CPU kernel from the hub or bundled, transformers' hub kernels) and the cell's (layers that
ran a hub kernel, 4-bit weights repacked for the fused kernel or not), and compare names a difference."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from qbench.machine import kernels


def test_the_machine_says_which_bitsandbytes_paths_it_takes():
    from bitsandbytes.backends.cpu import ops

    facts = kernels.describe()
    assert facts["kernels.bnb_native_library"].startswith("libbitsandbytes")
    assert facts["kernels.bnb_cpu_avx512bf16"] == hasattr(ops, "gemm_4bit_forward_kernel")
    fused = facts["kernels.bnb_4bit_fused_cpu_kernel"]
    if not hasattr(ops, "gemm_4bit_forward_kernel"):
        assert fused.startswith("not offered")
    elif ops.gemm_4bit_forward_kernel is None:  # offline, as in these tests: the hub kernel could not load
        assert fused.startswith("bundled in libbitsandbytes") and kernels.HUB_4BIT_KERNEL in fused
    else:
        assert fused == f"hub kernel {kernels.HUB_4BIT_KERNEL}"
    assert facts["kernels.torch_blas"] and facts["kernels.torch_float32_matmul_precision"] == torch.get_float32_matmul_precision()


def _nf4_llama():
    from transformers import AutoModelForCausalLM

    from qbench.cell import models
    from qbench.contract import precisions
    from qbench.contract.suite import ModelSpec

    path = models.resolve("builtin:tiny-llama")
    return models.load_base(AutoModelForCausalLM, path, precisions.get("nf4"), "bfloat16", "cpu", ModelSpec(id=path))


def test_a_cell_says_which_layers_ran_which_kernels_and_that_qbench_keeps_4bit_weights_unpacked():
    from qbench.cell import models
    from qbench.cell.readback import kernel_paths
    from qbench.contract import precisions

    model = _nf4_llama()
    models.disable_bnb_cpu_weight_packing(model)
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[1, 2, 3, 4]]))
    paths = kernel_paths(model, precisions.get("nf4"), "cpu")
    assert paths["kernels.attn_implementation"] in ("sdpa", "eager")
    assert paths["kernels.transformers_hub_layers"] > 0  # RMSNorm and SiLU ask transformers for a hub kernel
    assert paths["kernels.transformers_hub_layers_swapped"] == 0  # offline: none could be fetched
    assert paths["kernels.bnb_4bit_packed_layers"] == 0
    assert paths["kernels.bnb_4bit_matmul"] == "weights dequantized by bitsandbytes' CPU library, multiplied by torch"
    assert paths["kernels.bnb_4bit_compute_dtypes"] == "bfloat16"


def test_the_dtype_a_4bit_layer_computed_in_is_read_after_it_ran():
    """bitsandbytes would take a float32 or bf16 input's dtype at the first forward of a layer built without a compute
    dtype; qbench always gives bnb_4bit_compute_dtype, so a float32 input still computes in bf16, read after it ran."""
    from qbench.cell.readback import kernel_paths
    from qbench.contract import precisions

    model = _nf4_llama()
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    out = layer.train()(torch.randn(2, layer.in_features, dtype=torch.float32))
    assert out.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16
    assert kernel_paths(model, precisions.get("nf4"), "cpu")["kernels.bnb_4bit_compute_dtypes"] == "bfloat16"


def test_left_alone_bitsandbytes_repacks_4bit_weights_in_eval_and_the_record_says_so():
    """What plain transformers and lm-eval run on an AVX512-BF16 CPU: the first no-grad forward in eval mode repacks
    every Linear4bit for the fused kernel (moving NF4 perplexity in its last digits)."""
    from bitsandbytes.backends.cpu import ops

    from qbench.cell.readback import kernel_paths
    from qbench.contract import precisions

    if not hasattr(ops, "gemm_4bit_forward_kernel"):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes offers no fused 4-bit kernel")
    model = _nf4_llama()
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[1, 2, 3, 4]]))
    paths = kernel_paths(model, precisions.get("nf4"), "cpu")
    layers = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert paths["kernels.bnb_4bit_packed_layers"] == layers
    assert paths["kernels.bnb_4bit_matmul"].startswith(f"fused kernel on repacked weights in {layers} of {layers} layers")


def test_compare_names_a_kernel_that_differs():
    from qbench.analysis.gate.compare import _code_notes

    base = pd.DataFrame({"kernels.bnb_4bit_fused_cpu_kernel": ["bundled in libbitsandbytes_cpu.so"]})
    new = pd.DataFrame({"kernels.bnb_4bit_fused_cpu_kernel": ["hub kernel kernels-community/quantization-bitsandbytes"]})
    (note,) = _code_notes(base, new)
    assert note.startswith("kernels.bnb_4bit_fused_cpu_kernel differs (baseline bundled in libbitsandbytes_cpu.so, new hub")
    assert _code_notes(base, base) == []
