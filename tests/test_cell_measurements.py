"""Real cells on the CPU carry every measurement, and a cell whose base is not what its name says fails.

The suite runs a throwaway tiny CLIP (tests/helpers/clip.py) through the command line, one process per
cell. A sitecustomize.py on the cells' PYTHONPATH makes the loading of one arm drop its
quantization_config, as a mislabelled configuration would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract import records as results

from .helpers import clip

PHASES = ("data", "load", "prepare", "eval_before", "train", "eval_after")

DROP_QUANTIZATION = '''
import os
from qbench.cell import models

_dropped = set(os.environ.get("QBENCH_TEST_DROP_QUANTIZATION", "").split(","))
_original = models.quantization_config


def _without_quantization(precision, compute_dtype, **settings):
    return None if precision.name in _dropped else _original(precision, compute_dtype, **settings)


models.quantization_config = _without_quantization
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cells")
    checkpoint = clip.checkpoint(folder / "checkpoint", hidden=64, heads=4, image_size=32, patch_size=8)
    data = clip.images_tsv(folder / "data", train_images=24, eval_images=12, size=32)
    suite = folder / "suite.toml"
    suite.write_text(clip.suite(
        checkpoint, data, ("bf16", "nf4", "fp4-dq"), name="tmpclip", steps=4,
        lora='r = 4\nalpha = 8\ntarget_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]',
        evaluation="batch_size = 64\nrecall_k = [1, 5]",
    ))
    hook = folder / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DROP_QUANTIZATION)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "QBENCH_TEST_DROP_QUANTIZATION")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), saved["PYTHONPATH"]]))
    os.environ["QBENCH_TEST_DROP_QUANTIZATION"] = "fp4-dq"
    try:
        code = cli.main(["run", str(suite), "--out", str(folder / "out"), "--device", "cpu"])
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    (run_dir,) = (folder / "out" / "tmpclip").iterdir()
    return {"code": code, "dir": run_dir, "records": {r["precision"]: r for r in results.read_records(run_dir)}}


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_every_cpu_record_carries_every_measurement(run, precision):
    record = run["records"][precision]
    assert record["status"] == "ok", record.get("error")
    for phase in PHASES:
        assert record[f"memory.{phase}.rss_peak_bytes"] > 100 * 1024 * 1024  # python + torch are resident
        for absent in ("torch_allocated_peak_bytes", "torch_reserved_peak_bytes", "nvml_process_peak_bytes", "nvml_device_peak_bytes"):
            assert f"memory.{phase}.{absent}" in record and record[f"memory.{phase}.{absent}"] is None
    assert record["memory.source.torch_cuda"].startswith("unavailable") and record["memory.source.nvml"].startswith("unavailable")
    assert record["memory.all_phases.rss_peak_bytes"] == max(record[f"memory.{p}.rss_peak_bytes"] for p in PHASES)
    assert record["weights.load.base_bytes"] == (
        record["weights.load.quantized_codes_bytes"] + record["weights.load.quant_state_bytes"] + record["weights.load.unquantized_bytes"]
    )
    assert record["weights.load.error.layers"] > 0 and record["weights.load.error.rel_max"] >= record["weights.load.error.rel_mean"] > 0
    assert 0 < record["speed.step_time_p50_s"] <= record["speed.step_time_p90_s"]
    assert record["speed.timed_steps"] == 3
    assert record["time.load.wall_s"] > 0


def test_the_quantized_record_has_its_bits_and_the_dense_one_has_none(run):
    nf4, bf16 = run["records"]["nf4"], run["records"]["bf16"]
    # nf4: 4 bits of code + one float32 absmax per 64 weights + a 64-byte code table per layer
    layers = nf4["weights.load.linears.linear4bit_count"]
    expected = 4 + 32 / 64 + 8 * 64 * layers / nf4["weights.load.quantized_params"]
    assert nf4["weights.load.bits_per_quantized_param"] == pytest.approx(expected, abs=0.01)
    assert nf4["weights.load.quant_state.absmax_bytes"] > 0 and nf4["weights.load.unquantized_bytes"] > 0
    assert bf16["weights.load.bits_per_quantized_param"] is None and bf16["weights.load.quantized_params"] == 0
    assert nf4["weights.load.error.rel_mean"] > 10 * bf16["weights.load.error.rel_mean"]
    assert nf4["weights.load.linears.quant_types"] == "nf4" and nf4["weights.load.linears.compressed_statistics"] == "false"


def test_a_base_loaded_without_its_4bit_settings_fails_naming_the_modules_that_disagree(run):
    record = run["records"]["fp4-dq"]
    assert record["status"] == "failed"
    assert record["error_type"] == "FormatMismatch"
    assert "does not match precision 'fp4-dq'" in record["error"]
    assert "text_model.encoder.layers.0.self_attn.k_proj is Linear, expected Linear4bit" in record["error"]
    assert record["weights.load.linears.linear4bit_count"] == 0  # what was read back is kept as evidence
    assert run["code"] == 1  # the command says that a cell failed


def test_the_summary_explains_the_bytes_and_shows_the_damage(run):
    summary = Path(run["dir"], "summary.md").read_text()
    assert "## Why a 4-bit base is not 4x smaller" in summary and "**nf4**: the base takes" in summary
    assert "## Quantization damage before fine-tuning" in summary
    assert "## Peak memory per phase (MiB)" in summary and "train RSS" in summary
    assert "fp4-dq-seed0" in summary  # listed among the cells that did not finish
