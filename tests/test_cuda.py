"""The CUDA and NVML paths on a real NVIDIA GPU (skipped without one; scripts/gpu_check.sh runs them).

Without a GPU the same code is covered by tests/test_nvml.py through a fake pynvml.
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from qbench.cell import models, probe
from qbench.cell.measure import nvml, weight_error, weights
from qbench.cell.measure.memory import MemoryTracker
from qbench.cell.measure.timing import StepTimer
from qbench.contract import precisions

from .helpers import clip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with a CUDA build of torch")

MiB = 1024 * 1024
SPEC = SimpleNamespace(revision=None, device_map="single", safetensors_only=True, trust_remote_code=False)


def test_nvml_finds_the_gpu_torch_calls_cuda_0():
    import pynvml

    uuid = str(torch.cuda.get_device_properties(0).uuid)
    device = nvml.NvmlDevice.open(0, uuid, pynvml=pynvml)
    try:
        assert nvml.normalize_uuid(device.device.uuid) == nvml.normalize_uuid(uuid)
        assert device.device_used_bytes() > 0
    finally:
        device.close()


def test_torch_and_nvml_peaks_are_per_phase_on_the_gpu():
    tracker = MemoryTracker("cuda:0")
    try:
        assert tracker.nvml_available, tracker.record["memory.source.nvml"]
        with tracker.phase("big"):
            block = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda").fill_(1)
            torch.cuda.synchronize()
            time.sleep(0.1)
            del block
        torch.cuda.empty_cache()
        with tracker.phase("small"):
            block = torch.empty(16 * MiB, dtype=torch.uint8, device="cuda").fill_(1)
            time.sleep(0.1)
            del block
    finally:
        tracker.close()
    record = tracker.record
    assert record["memory.big.torch_allocated_peak_bytes"] >= 512 * MiB
    assert record["memory.small.torch_allocated_peak_bytes"] < 64 * MiB  # reset at the phase start
    # NVML sees the CUDA context too: more than torch's allocator, and the device more than the process
    assert record["memory.big.nvml_process_peak_bytes"] >= record["memory.big.torch_reserved_peak_bytes"]
    assert record["memory.big.nvml_device_peak_bytes"] >= record["memory.big.nvml_process_peak_bytes"]
    assert record["memory.big.nvml_process_peak_bytes"] - record["memory.small.nvml_process_peak_bytes"] >= 400 * MiB


CHILD = """
import sys, time, torch
torch.zeros(1, device="cuda")  # the CUDA context first
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
block = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda").fill_(1)
torch.cuda.synchronize()
time.sleep(0.05)
del block
torch.cuda.empty_cache()
torch.cuda.synchronize()
print("done", flush=True)
sys.stdin.readline()
"""


def test_nvml_catches_a_50ms_gpu_spike_of_a_child_process():
    tracker = MemoryTracker("cuda:0")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(1024 * MiB)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with tracker.phase("context"):  # the child holds only its CUDA context
            time.sleep(0.3)
        with tracker.phase("spike"):
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
        child.stdin.write("exit\n")
        child.stdin.flush()
        child.wait(timeout=60)
    finally:
        child.kill()
        tracker.close()
    record = tracker.record
    grew = record["memory.spike.nvml_process_peak_bytes"] - record["memory.context.nvml_process_peak_bytes"]
    assert grew >= 1000 * MiB, record


def test_the_step_timer_waits_for_queued_kernels():
    timer = StepTimer(untimed_steps=0, cuda=True)
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timer.start()
    begin.record()
    for _ in range(20):
        a = a @ a / 64
    end.record()
    timer.stop(samples=1, tokens=1)  # without synchronising, this would read the clock long before the GPU is done
    torch.cuda.synchronize()
    assert timer.step_seconds[0] >= 0.9 * begin.elapsed_time(end) / 1000


@pytest.mark.parametrize("name", ["bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"])
def test_every_format_quantizes_runs_forward_and_backward_on_the_gpu(name):
    result = probe.probe_format(name, "cuda")
    assert result["status"] == "ok", result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(clip.checkpoint(tmp_path_factory.mktemp("tiny-clip"), hidden=64, heads=4, image_size=32, patch_size=8))


@pytest.mark.parametrize("name", ["int8", "nf4-dq"])
def test_byte_accounting_and_weight_error_are_the_same_on_gpu_and_cpu(checkpoint, name):
    from transformers import CLIPModel

    on = {d: models.load_base(CLIPModel, checkpoint, precisions.get(name), "bfloat16", d, SPEC) for d in ("cpu", "cuda")}
    assert weights.account_base(on["cuda"]) == weights.account_base(on["cpu"])
    weights.check_format(on["cuda"], precisions.get(name), "bfloat16")
    errors = {d: weight_error.measure(model, checkpoint)["weights.load.error.rel_mean"] for d, model in on.items()}
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=0.05)



@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw8bit"])
def test_a_paged_optimizer_pages_large_state_on_the_gpu_and_the_record_says_how_much(name):
    from qbench.cell.measure import optimizer_state
    from qbench.cell.train import build_optimizer
    from qbench.contract import optimizers

    large, small = (torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (256 * 1024, 4096))
    optimizer = build_optimizer(optimizers.get(name), [large, small], lr=1e-3, weight_decay=0.0)
    large.grad, small.grad = torch.ones_like(large), torch.ones_like(small)
    optimizer.step()
    record = optimizer_state.describe(optimizer, optimizers.get(name), "cuda:0")
    assert record["optimizer.paged"] is True and record["optimizer.paged_reason"] is None
    # only the large parameter's moments are paged (bitsandbytes pages state of >= 100,000 elements)
    per_element = 2 * (4 if name == "paged_adamw" else 1)
    assert record["optimizer.paged_state_bytes"] == per_element * 256 * 1024
    assert record["optimizer.state_bytes"] > record["optimizer.paged_state_bytes"]
