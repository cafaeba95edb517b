"""A real run of a small grid on the builtin tiny Llama, through the command line: every record holds its
axis values and its optimizer's state bytes; report and compare see the grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qbench import cli
from qbench.contract import grid
from qbench.contract import records as results

from .conftest import SUITES, write_suite


def small_qlora(name: str = "qlora-small") -> str:
    """suites/qlora.toml cut down to two short nf4-dq cells (adamw, paged_adamw8bit) of tiny batches."""
    text = (SUITES / "qlora.toml").read_text()
    text = text.replace('name = "qlora"', f'name = "{name}"').replace("steps = 40", "steps = 3").replace("untimed_steps = 3", "untimed_steps = 1")
    text = text.replace("warmup_steps = 4", "warmup_steps = 1")  # warm-up must leave steps at the scheduled rate
    text = text.replace('baseline = "bf16"', 'baseline = "nf4-dq"')  # the baseline is one of the matrix's precisions
    # tiny batches through the matrix (one value each), over the suite file's batch 8 of 128 tokens
    text = text.replace("[eval]\n", "[eval]\nbefore = false\n").replace("[matrix]\n", "[matrix]\nbatch_size = [2]\nmax_length = [32]\n")
    return text.replace('precisions = ["bf16", "nf4-dq"]', 'precisions = ["nf4-dq"]').replace(
        'optimizers = ["adamw", "adamw8bit", "paged_adamw8bit"]', 'optimizers = ["adamw", "paged_adamw8bit"]'
    ).replace('exclude = [{ precision = "bf16", optimizer = ["adamw8bit", "paged_adamw8bit"] }]', "")


def test_a_grid_run_records_axes_and_optimizer_state_and_compare_matches_its_cells(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, small_qlora())
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out), "--device", "cpu"]) == 0
    (run_dir,) = (out / "qlora-small").iterdir()
    records = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert sorted(records) == ["nf4-dq-adamw-seed0", "nf4-dq-paged_adamw8bit-seed0"]
    adamw, paged = records["nf4-dq-adamw-seed0"], records["nf4-dq-paged_adamw8bit-seed0"]
    for record in records.values():
        assert record["status"] == "ok", record.get("error")
        assert {key for key in grid.RECORD_KEYS} <= set(record)
        assert (record["config.train.batch_size"], record["config.train.max_length"], record["config.lora.r"]) == (2, 32, 32)
        # the task trained with the cell's values, not the suite file's (batch 8, 128 tokens): samples and tokens timed
        samples = record["speed.train_samples_per_s"] * record["speed.timed_wall_s"]
        assert samples == pytest.approx(2 * record["speed.timed_steps"])
        assert record["speed.train_tokens_per_s"] / record["speed.train_samples_per_s"] == pytest.approx(32)
    assert (adamw["config.train.optimizer"], paged["config.train.optimizer"]) == ("adamw", "paged_adamw8bit")
    assert adamw["optimizer.class"] == "torch.optim.adamw.AdamW"
    assert paged["optimizer.class"] == "bitsandbytes.optim.adamw.PagedAdamW8bit"
    assert 0.25 < paged["optimizer.state_bytes"] / adamw["optimizer.state_bytes"] < 0.26
    assert paged["optimizer.params_with_8bit_state"] == paged["optimizer.params"] == 32
    assert paged["optimizer.paged"] is False and "only on CUDA" in paged["optimizer.paged_reason"]
    assert adamw["params.trainable"] == paged["params.trainable"]
    summary = (run_dir / "summary.md").read_text()
    assert "nf4-dq adamw" in summary and "÷ adamw state" in summary

    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report" / "plots" / "optimizer_state.png").is_file()
    capsys.readouterr()
    assert cli.main(["compare", str(run_dir), str(run_dir), "--markdown", "-"]) == 0
    assert "nf4-dq paged_adamw8bit" in capsys.readouterr().out


def test_gradient_checkpointing_as_an_axis_trains_the_same_adapters(tiny_llama_path: str):
    """Checkpointing recomputes activations; it must not cut the gradient to the adapters (a frozen
    base with checkpointing can leave LoRA without gradient and still report status ok)."""
    from qbench.cell import lora, models
    from qbench.cell.measure.timing import StepTimer
    from qbench.cell.tasks import get_task
    from qbench.cell.train import train
    from qbench.contract import precisions
    from qbench.contract.suite import LoadedSuite, parse

    text = small_qlora().replace('optimizers = ["adamw", "paged_adamw8bit"]', "gradient_checkpointing = [false, true]")
    loaded = LoadedSuite(parse(text), SUITES / "qlora.toml", "0" * 64, text)
    updates = {}
    for cell in loaded.cells():
        cell_suite = loaded.for_cell(cell)
        suite = cell_suite.suite
        task = get_task(cell_suite, tiny_llama_path, "cpu")
        task.prepare_data()
        model = models.load_base(task.model_class, tiny_llama_path, precisions.get(cell.precision), suite.compute_dtype, "cpu", suite.model)
        model = lora.attach(lora.prepare(model, suite), suite, task.peft_task_type, cell.seed)  # as the cell does
        assert model.base_model.model.is_gradient_checkpointing == suite.train.gradient_checkpointing
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.manual_seed(cell.seed)
        train(model, task.train_batches(cell.seed), task.loss, suite.train, StepTimer(1))
        updates[cell.id] = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters() if p.requires_grad])
    assert sorted(updates) == ["nf4-dq-gc-seed0", "nf4-dq-nogc-seed0"]
    assert updates["nf4-dq-nogc-seed0"].norm() > 0
    assert torch.allclose(updates["nf4-dq-gc-seed0"], updates["nf4-dq-nogc-seed0"], rtol=1e-4, atol=1e-7)
