"""The optimizer registry: what each builds, its exact state bytes, paging read back, and 8-bit AdamW
training the same adapters as torch's AdamW."""

from __future__ import annotations

import math

import pytest
import torch

from qbench.cell.measure import optimizer_state
from qbench.cell.train import build_optimizer
from qbench.contract import grid, optimizers
from qbench.contract.suite import load

from .conftest import SUITES

# the LoRA parameters of suites/qlora.toml on the tiny Llama: r = 32 on q/k/v/o_proj of 4 layers,
# width 128 -> 32 matrices of 32 x 128 or 128 x 32, 4,096 elements each (bitsandbytes' min_8bit_size)
LORA_SHAPES = [(32, 128), (128, 32)] * 16


def stepped(name: str, shapes=LORA_SHAPES, device: str = "cpu") -> dict:
    """The record fields of optimizer `name` after one step over parameters of `shapes`."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in shapes]
    optimizer = build_optimizer(optimizers.get(name), params, lr=1e-3, weight_decay=0.0)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer_state.describe(optimizer, optimizers.get(name), device)


def test_adamw_is_the_default_and_builds_torch_adamw():
    assert optimizers.DEFAULT == "adamw"
    record = stepped("adamw")
    assert record["optimizer.class"] == "torch.optim.adamw.AdamW"
    assert (record["optimizer.beta1"], record["optimizer.beta2"], record["optimizer.eps"]) == (0.9, 0.999, 1e-8)
    # two float32 moments per element, and torch's step counter: one float32 scalar per parameter
    elements = sum(a * b for a, b in LORA_SHAPES)
    assert record["optimizer.state_bytes"] == 2 * 4 * elements + 4 * len(LORA_SHAPES)
    assert record["optimizer.state.float32_bytes"] == record["optimizer.state_bytes"]
    assert record["optimizer.state.uint8_bytes"] == 0
    assert record["optimizer.params_with_32bit_state"] == 32 and record["optimizer.params_with_8bit_state"] == 0


def test_8bit_adamw_state_is_a_quarter_of_32bit_state_for_the_same_lora_parameters():
    eight, thirty_two = stepped("adamw8bit"), stepped("adamw")
    elements = sum(a * b for a, b in LORA_SHAPES)
    # per element one byte per moment; per block of 256 a float32 absmax per moment; one shared 256-entry map per moment
    assert eight["optimizer.state.uint8_bytes"] == 2 * elements
    assert eight["optimizer.state.float32_bytes"] == 2 * 4 * (elements // 256) + 2 * 256 * 4
    assert eight["optimizer.params_with_8bit_state"] == 32
    ratio = eight["optimizer.state_bytes"] / thirty_two["optimizer.state_bytes"]
    assert ratio == pytest.approx(268_288 / 1_048_704)
    assert 0.25 < ratio < 0.26


def test_parameters_below_min_8bit_size_keep_32bit_state_and_the_record_says_how_many():
    record = stepped("adamw8bit", shapes=[(8, 128), (128, 32)])  # 1,024 elements: below bitsandbytes' 4,096
    assert record["optimizer.min_8bit_size"] == optimizers.BNB_MIN_8BIT_SIZE == 4096
    assert (record["optimizer.params_with_8bit_state"], record["optimizer.params_with_32bit_state"]) == (1, 1)
    assert record["optimizer.state.uint8_bytes"] == 2 * 128 * 32


def test_lion8bit_keeps_one_8bit_moment():
    lion, adamw8bit = stepped("lion8bit"), stepped("adamw8bit")
    assert lion["optimizer.state.uint8_bytes"] * 2 == adamw8bit["optimizer.state.uint8_bytes"]
    assert (lion["optimizer.beta1"], lion["optimizer.beta2"]) == (0.9, 0.99)


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw8bit"])
def test_a_paged_optimizer_on_the_cpu_says_paging_is_not_in_effect_and_why(name: str):
    with pytest.warns(UserWarning, match="not supported on CPU"):
        record = stepped(name)
    assert record["optimizer.requests_paging"] is True
    assert record["optimizer.paged"] is False and record["optimizer.paged_state_bytes"] == 0
    assert "only on CUDA" in record["optimizer.paged_reason"]
    unpaged = stepped(name.removeprefix("paged_"))
    assert unpaged["optimizer.paged_reason"] == f"{name.removeprefix('paged_')} is not a paged optimizer"
    assert record["optimizer.state.uint8_bytes"] == unpaged["optimizer.state.uint8_bytes"]


def test_on_cuda_small_lora_parameters_are_not_paged_and_the_reason_says_so():
    reason = optimizer_state.paging_reason(optimizers.get("paged_adamw8bit"), "cuda:0", paged_bytes=0, largest_param=4096)
    assert "at least 100,000 elements" in reason and "4,096" in reason
    assert optimizer_state.paging_reason(optimizers.get("paged_adamw8bit"), "cuda:0", paged_bytes=1024, largest_param=10**6) is None


def test_every_registered_optimizer_builds_and_steps_on_the_cpu():
    for name in optimizers.REGISTRY:
        record = stepped(name, shapes=[(64, 64)])
        assert record["optimizer.name"] == name and record["optimizer.state_bytes"] > 0
    with pytest.raises(KeyError, match="known: adamw"):
        optimizers.get("adam")


def _adapter_update(optimizer: str) -> torch.Tensor:
    """The change of every LoRA parameter after a short fine-tune of the tiny Llama (suites/qlora.toml,
    bf16 base, shortened) with `optimizer`, from the same initial adapters and the same batches."""
    from qbench.cell import lora, models
    from qbench.cell.measure.timing import StepTimer
    from qbench.cell.tasks import get_task
    from qbench.cell.train import train
    from qbench.contract import precisions

    loaded = load(SUITES / "qlora.toml")
    cell = grid.cell_from_values(loaded.suite, {"precision": "bf16", "seed": 0, "optimizer": optimizer, "batch_size": 2,
                                                "max_length": 32})
    cell_suite = loaded.for_cell(cell)
    suite = cell_suite.suite
    config = suite.train.model_copy(update={"steps": 8, "untimed_steps": 1})
    path = models.resolve(suite.model.id)
    task = get_task(cell_suite, path, "cpu")
    task.prepare_data()
    model = models.load_base(task.model_class, path, precisions.get("bf16"), suite.compute_dtype, "cpu", suite.model)
    model = lora.attach(lora.prepare(model, suite), suite, task.peft_task_type, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    train(model, task.train_batches(0), task.loss, config, StepTimer(1))
    return torch.cat([(p.detach() - before[n]).flatten().float() for n, p in model.named_parameters() if p.requires_grad])


def test_8bit_adamw_trains_adapters_close_to_torch_adamw_and_another_optimizer_does_not():
    reference = _adapter_update("adamw")
    assert reference.norm() > 0
    distance = {name: float((_adapter_update(name) - reference).norm() / reference.norm()) for name in ("adamw8bit", "lion8bit")}
    assert math.isfinite(distance["adamw8bit"]) and distance["adamw8bit"] < 0.1, distance  # measured: 0.02
    assert distance["lion8bit"] > 0.3, distance  # measured 0.8: the check can tell optimizers apart
