"""compute_dtype = "auto": what the device computes natively, with its reason; the `dense` arm follows it;
an emulated dtype is named, measured and warned about."""

from __future__ import annotations

import pytest
import torch

from qbench.cell.models import quantization_config, storage_dtype
from qbench.contract import precisions
from qbench.machine import compute
from qbench.runner import launch

NO_BF16 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})  # the CPU of issue 12: AVX2, no AVX512-BF16
AVX512_BF16 = NO_BF16 | {"avx512f", "avx512_bf16"}
AMX = NO_BF16 | {"amx_bf16", "amx_tile"}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "avx512_bf16" in compute.cpu_flags(str(x86)) and "bf16" in compute.cpu_flags(str(arm))
    assert compute.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(("flags", "expected", "because"), [
    (NO_BF16, "float32", "bf16 would be emulated"),
    (AVX512_BF16, "bfloat16", "avx512_bf16"),
    (AMX, "bfloat16", "amx_bf16"),
])
def test_auto_on_a_cpu_is_bf16_only_with_bf16_instructions(flags, expected, because):
    choice = compute.choose("auto", "cpu", flags=flags)
    assert choice.dtype == expected and because in choice.reason and choice.emulated == ()
    assert choice.record_fields()["config.compute_dtype"] == expected
    assert choice.record_fields()["compute.dtype_reason"] == choice.reason


def test_auto_on_a_gpu_is_bf16_where_it_has_bf16_else_fp16():
    assert compute.choose("auto", "cuda", cuda_bf16=True).dtype == "bfloat16"
    older = compute.choose("auto", "cuda:1", cuda_bf16=False)
    assert older.dtype == "float16" and "no bf16" in older.reason and older.emulated == ()


def test_an_explicit_dtype_the_cpu_emulates_is_kept_and_warned_about_with_its_factor():
    choice = compute.choose("bfloat16", "cpu", flags=NO_BF16)
    assert choice.dtype == "bfloat16" and choice.emulated == ("bfloat16",)  # a warning, not a refusal
    measured = compute.ComputeChoice(**{**choice.__dict__, "factors": {"bfloat16": 9.7}})
    (warning,) = measured.warnings()
    assert "bfloat16 is emulated" in warning and "9.7x slower than float32" in warning and "avx512_bf16" in warning
    assert measured.record_fields()["compute.bfloat16_slowdown_x"] == 9.7
    assert compute.choose("bfloat16", "cpu", flags=AVX512_BF16).warnings() == []


def test_a_bf16_arm_on_a_cpu_without_bf16_is_emulated_even_when_the_compute_dtype_is_float32():
    choice = compute.choose("auto", "cpu", dense_dtypes=precisions.dense_dtypes(["bf16", "nf4"]), flags=NO_BF16)
    assert choice.dtype == "float32" and choice.emulated == ("bfloat16",)
    assert compute.choose("auto", "cpu", dense_dtypes=("float32",), flags=NO_BF16).emulated == ()


def test_the_dense_arm_is_the_base_in_the_compute_dtype():
    dense = precisions.get(precisions.DENSE)
    assert storage_dtype(dense, "float32") == torch.float32 and storage_dtype(dense, "bfloat16") == torch.bfloat16
    assert quantization_config(dense, "float32") is None
    assert dense.settings("float32")["dense_dtype"] == "float32"  # the record says what it really was
    assert precisions.get("bf16").settings("float32")["dense_dtype"] == "bfloat16"
    assert precisions.dense_dtypes(["dense", "int8", "fp16"]) == ("float16",)
    assert precisions.DEFAULT_MATRIX[0] == precisions.DENSE


def test_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="auto"):
        compute.choose("bf16", "cpu")


@pytest.mark.slow
def test_the_probe_child_measures_how_much_slower_an_emulated_dtype_is():
    # float16 has no CPU instructions here (AVX512-FP16 is a server-CPU feature): the probe times a small
    # block in float16 and in float32 and reports the ratio
    answer = launch.run_probe(None, {"device": "cpu", "setting": "float16", "dense_dtypes": []})  # as `python -m`
    assert answer["device"] == "cpu" and answer["cuda_available"] is False
    choice = answer["choice"]
    assert choice["dtype"] == "float16"
    if "float16" in choice["emulated"]:
        assert choice["factors"]["float16"] > 0
