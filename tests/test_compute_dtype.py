"""compute_dtype = "auto": the dtype whose training step of the suite's model measured fastest here (kept in the
user cache), with its reason; the `dense` arm follows it; an emulated or slow dtype is named and warned about."""

from __future__ import annotations

import pytest
import torch

from qbench.cell.models import quantization_config, storage_dtype
from qbench.contract import precisions
from qbench.machine import compute
from qbench.runner import launch

from .conftest import REPO

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


def timings(**step_ms: float) -> compute.DtypeTimings:
    return compute.DtypeTimings({d: ms / 1000 for d, ms in step_ms.items()}, {"float16": "over 5x slower in its first step"},
                                "forward, loss and backward of CLIPModel", "2026-01-01T00:00:00+00:00")


@pytest.mark.parametrize("flags", [NO_BF16, AVX512_BF16, AMX])
def test_auto_takes_the_measured_fastest_dtype_whatever_the_cpu_flags_say(flags):
    # issue 28: an EPYC with AVX512-BF16 trained the tiny CLIP 1.7x slower in bf16 than in float32
    slow_bf16 = compute.choose("auto", "cpu", flags=flags, timings=timings(float32=40, bfloat16=70))
    assert slow_bf16.dtype == "float32" and "float32 40 ms, bfloat16 70 ms (1.8x)" in slow_bf16.reason
    fast_bf16 = compute.choose("auto", "cpu", flags=flags, timings=timings(float32=40, bfloat16=20))
    assert fast_bf16.dtype == "bfloat16" and fast_bf16.reason.startswith("auto: the fastest training step")


def test_a_lower_precision_must_be_clearly_faster_to_be_chosen():
    assert compute.choose("auto", "cpu", timings=timings(float32=40, bfloat16=36)).dtype == "float32"  # inside TIE_SHARE
    assert compute.choose("auto", "cpu", timings=timings(float32=40, bfloat16=30)).dtype == "bfloat16"
    assert compute.choose("auto", "cuda", cuda_bf16=True, timings=timings(float32=40, bfloat16=30, float16=29)).dtype == "bfloat16"


def test_the_record_says_what_was_measured():
    choice = compute.choose("auto", "cpu", flags=AVX512_BF16, timings=timings(float32=40, bfloat16=70))
    fields = choice.record_fields()
    assert fields["config.compute_dtype"] == "float32" and fields["compute.dtype_reason"] == choice.reason
    assert fields["compute.float32_step_s"] == 0.04 and fields["compute.bfloat16_step_s"] == 0.07
    assert fields["compute.bfloat16_slowdown_x"] == 1.75 and fields["compute.dtype_measurement_cached"] is False
    assert "CLIPModel" in fields["compute.dtype_measurement"] and "float16 over 5x slower" in fields["compute.dtype_reason"]
    assert compute.ComputeChoice.from_json(choice.to_json()) == choice  # run.json and the cell's spec carry it


def test_auto_without_a_measurement_is_float32_on_a_cpu_and_says_why():
    choice = compute.choose("auto", "cpu", flags=AVX512_BF16, unmeasured="the measurement failed: boom")
    assert choice.dtype == "float32" and choice.reason.startswith("auto: not measured (the measurement failed: boom)")
    assert "float32 computed" not in choice.reason
    everything_failed = compute.choose("auto", "cpu", timings=compute.DtypeTimings({}, {"float32": "failed (x)"}))
    assert everything_failed.dtype == "float32" and "float32 failed (x)" in everything_failed.reason


def test_auto_on_a_gpu_without_a_measurement_is_bf16_where_it_has_bf16_else_fp16():
    assert compute.choose("auto", "cuda", cuda_bf16=True).dtype == "bfloat16"
    older = compute.choose("auto", "cuda:1", cuda_bf16=False)
    assert older.dtype == "float16" and older.emulated == ()


def test_an_explicit_dtype_the_cpu_emulates_is_kept_and_warned_about_with_its_factor():
    choice = compute.choose("bfloat16", "cpu", flags=NO_BF16, timings=timings(float32=40, bfloat16=388))
    assert choice.dtype == "bfloat16" and choice.emulated == ("bfloat16",)  # a warning, not a refusal
    (warning,) = choice.warnings()
    assert "bfloat16 is emulated" in warning and "9.7x slower than float32" in warning and "avx512_bf16" in warning
    assert choice.record_fields()["compute.bfloat16_slowdown_x"] == 9.7
    assert compute.choose("bfloat16", "cpu", flags=AVX512_BF16).warnings() == []


def test_a_dense_arm_in_a_dtype_that_measured_slow_is_warned_about():
    choice = compute.choose("auto", "cpu", dense_dtypes=("bfloat16",), flags=AVX512_BF16, timings=timings(float32=40, bfloat16=70))
    (warning,) = choice.warnings()
    assert choice.dtype == "float32" and "bfloat16 steps of this suite's model measured 1.8x slower than float32" in warning
    assert compute.choose("auto", "cpu", dense_dtypes=("bfloat16",), timings=timings(float32=40, bfloat16=44)).warnings() == []


def test_a_bf16_arm_on_a_cpu_without_bf16_is_emulated_even_when_the_compute_dtype_is_float32():
    choice = compute.choose("auto", "cpu", dense_dtypes=precisions.dense_dtypes(["bf16", "nf4"]), flags=NO_BF16)
    assert choice.dtype == "float32" and choice.emulated == ("bfloat16",)
    assert compute.choose("auto", "cpu", dense_dtypes=("float32",), flags=NO_BF16).emulated == ()


def test_a_measurement_is_kept_for_its_key_alone(tmp_path):
    key = {"device": "cpu", "torch": "2.13.0+cpu", "model": "builtin:tiny-clip", "batch_size": 32}
    assert compute.read_cached(key, tmp_path) is None
    kept = compute.write_cached(key, timings(float32=40, bfloat16=70), tmp_path)
    assert kept.cache_path and kept.cached is False
    again = compute.read_cached(key, tmp_path)
    assert again.cached is True and again.step_s == {"float32": 0.04, "bfloat16": 0.07} and again.measure_s is None
    assert compute.read_cached({**key, "torch": "2.14.1+cpu"}, tmp_path) is None  # another torch measures again
    compute.cache_file(key, tmp_path).write_text("{ torn")
    assert compute.read_cached(key, tmp_path) is None


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
def test_the_probe_child_measures_the_suites_model_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    suite = (REPO / "suites" / "clip.toml").read_text()
    request = {"device": "cpu", "setting": "auto", "dense_dtypes": [], "suite_text": suite,
               "suite_path": str(REPO / "suites" / "clip.toml"), "threads": 1}
    answer = launch.run_probe(None, request)  # as `python -m`
    assert answer["device"] == "cpu" and answer["cuda_available"] is False
    first = compute.ComputeChoice.from_dict(answer["choice"])
    measured = first.timings
    assert measured is not None and not measured.cached and "float32" in measured.step_s
    assert "CLIPModel (its own weights)" in measured.workload and first.dtype in measured.step_s
    again = compute.ComputeChoice.from_dict(launch.run_probe(None, request)["choice"])
    assert again.timings.cached and again.timings.step_s == measured.step_s and again.dtype == first.dtype
