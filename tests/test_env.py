"""`qbench env`: each weight format is tried on the device, NVML is looked at, nothing is assumed."""

from __future__ import annotations

import json
import os

import pytest

from qbench import cli
from qbench.cell import probe
from qbench.cli import render
from qbench.machine import environment

from .fake_nvml import pynvml as fake
from .test_nvml import GPU_A, GPU_B, MiB


def test_a_format_is_tried_and_its_output_compared_with_the_dense_layer():
    result = probe.probe_format("nf4", "cpu")
    assert result["status"] == "ok", result
    assert 0.02 < result["output_rel_error"] < 0.3  # 4-bit: a few percent off, not zero, not garbage
    assert probe.probe_format("fp32", "cpu")["output_rel_error"] == 0.0


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_every_registered_format_works_on_the_cpu_in_either_compute_dtype(compute_dtype):
    """The dense arm stores the compute dtype the probe asked for (float32 where auto chose it): never reported
    as broken for storing what it was asked to store (review B, F1)."""
    from qbench.contract import precisions

    results = {name: probe.probe_format(name, "cpu", compute_dtype) for name in precisions.REGISTRY}
    assert {name: r["status"] for name, r in results.items() if r["status"] != "ok"} == {}, results


def test_a_format_whose_kernel_fails_is_reported_as_not_working(monkeypatch):
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    result = probe.probe_format("fp4-dq", "cpu")
    assert result["status"] == "failed"
    assert "no 4-bit kernel for this device" in result["error"]


def test_nvml_facts_map_each_torch_device_to_its_nvml_device(monkeypatch, tmp_path):
    fake.configure(tmp_path, [
        {"uuid": GPU_A, "name": "Fake A100", "total_bytes": 40 * 1024 * MiB, "reserved_bytes": 300 * MiB},
        {"uuid": GPU_B, "name": "Fake H100", "total_bytes": 80 * 1024 * MiB, "reserved_bytes": 500 * MiB},
    ])
    monkeypatch.setenv(fake.STATE_ENV, str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    fake.set_usage(os.getpid(), 100 * MiB, device=1)
    torch_devices = [{"torch_device": "cuda:0", "uuid": GPU_B.removeprefix("GPU-")}]
    facts = probe.nvml_facts(torch_devices)
    assert facts["available"] and facts["driver_version"] == "550.54.15"
    assert [d["name"] for d in facts["devices"]] == ["Fake A100", "Fake H100"]
    assert facts["devices"][1]["used_bytes"] == 600 * MiB
    assert facts["devices"][1]["per_process_memory"] == "readable (1 processes listed)"
    assert torch_devices[0]["nvml_index"] == 1 and "UUID" in torch_devices[0]["nvml_match"]


def test_qbench_env_json_reports_versions_nvml_and_every_format(capsys):
    assert cli.main(["env", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packages"]["torch"] and report["packages"]["bitsandbytes"]
    assert report["formats_device"] == "cpu"
    assert set(report["formats"]) == {"dense", "bf16", "fp16", "fp32", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"}
    assert all(r["status"] in ("ok", "failed") for r in report["formats"].values())
    assert report["formats"]["bf16"]["status"] == "ok"
    assert report["nvml"]["available"] or report["nvml"]["reason"]
    assert "cuda_available" in report["torch"]


def test_qbench_env_renders_tables(monkeypatch, capsys):
    canned = {
        "packages": {"torch": "2.13.0", "bitsandbytes": None}, "python": "3.11", "platform": "Linux", "cpu_model": "cpu",
        "cpu_count": 2, "environment": {"CUDA_VISIBLE_DEVICES": None, "CUDA_DEVICE_ORDER": None},
        "torch": {"cuda_build": "12.4", "cuda_available": True, "devices": [
            {"torch_device": "cuda:0", "name": "H100", "capability": "9.0", "total_memory_bytes": 80 * 1024 * MiB,
             "bf16_supported": True, "nvml_index": 1, "nvml_match": "matched by the UUID torch reports"}]},
        "nvml": {"available": True, "driver_version": "550.54.15", "devices": []},
        "formats_device": "cuda", "formats_compute_dtype": "bfloat16",
        "formats": {"nf4": {"status": "ok", "output_rel_error": 0.09, "seconds": 0.1},
                    "int8": {"status": "failed", "error": "RuntimeError: no kernel", "seconds": 0.1}},
    }
    monkeypatch.setattr(environment, "machine_report", lambda *args: canned)
    monkeypatch.setattr(render.console, "width", 200)
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "not installed" in out and "550.54.15" in out
    assert "matched by the UUID torch reports" in out
    assert "9.00%" in out and "RuntimeError: no kernel" in out


def test_a_crashing_probe_is_reported_not_raised(monkeypatch):
    import subprocess

    real_run = subprocess.run

    def crashing_probe(command, **kwargs):
        if "qbench.cell.probe" in command:
            command = [command[0], "-c", "import sys; sys.stderr.write('Segmentation fault'); sys.exit(139)"]
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", crashing_probe)
    report = environment.machine_report("cpu")
    assert "exited with code 139" in report["probe_error"] and "Segmentation fault" in report["probe_error"]
    assert report["packages"]["torch"]  # what the parent process knows is still there
