"""A real run of a two-cell suite on the builtin tiny CLIP, through the command line."""

import json
import os
from pathlib import Path

import pandas as pd

from qbench import cli
from qbench.contract import records as results

from .conftest import write_suite
from .helpers import clip
from .helpers.schema import assert_schema_3_run

TWO_CELLS = clip.suite(
    precisions=("bf16", "nf4-dq"), name="e2e", steps=4, train="batch_size = 16\nlr = 1e-3\nmax_length = 16\nuntimed_steps = 1",
    lora='r = 4\nalpha = 8\ntarget_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]', evaluation=None,
)


def test_two_cell_suite_runs_each_cell_in_its_own_process_and_writes_records(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, TWO_CELLS)
    code = cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    # the closing table has the precisions as columns, so it stays readable 80 columns wide (a CI log)
    shown = capsys.readouterr().out.splitlines()
    assert any("bf16" in line and "nf4-dq" in line for line in shown)
    (samples_row,) = [line for line in shown if line.startswith("│ train samples/s") and "×" not in line]
    assert "…" not in samples_row and len(samples_row.split("│")) == 5  # label, bf16, nf4-dq
    text = "\n".join(shown)
    assert text.index("Answer") < text.index("Verdict") < text.index("Per precision")  # the answer first, then the tables
    assert shown[-1].startswith("Answer: nf4-dq stores the base") and shown[-1].endswith("(measure them on a GPU).")
    assert any(line.startswith("plots and the HTML page: qbench report ") for line in shown)
    # RSS on a CPU: said once for every precision, not on each line
    assert " ".join(text.split()).count("Not measured meaningfully on this CPU, for any precision: peak memory and speed") == 1
    (run_dir,) = (tmp_path / "out" / "e2e").iterdir()
    assert len(assert_schema_3_run(run_dir)) == 2  # every record the run wrote is schema 3 and validates as it is
    records = {r["precision"]: r for r in results.read_records(run_dir)}
    assert set(records) == {"bf16", "nf4-dq"}
    for record in records.values():
        assert record["status"] == "ok", record.get("error")
        clip.assert_recall_is_an_exact_share(record, "eval_after")
        assert record["speed.timed_steps"] == 3
        assert record["memory.all_phases.rss_peak_bytes"] > 0
        # the runtime before the model: most of the peak on a CPU, and never more than the load phase's peak
        assert 0 < record["memory.process_baseline.rss_bytes"] <= record["memory.load.rss_peak_bytes"]
        assert record["memory.train.torch_allocated_peak_bytes"] is None
        assert record["memory.source.torch_cuda"].startswith("unavailable")
        assert record["params.trainable"] > 0
    # each cell ran in a fresh process of its own (not this one), and the same LoRA shapes were trained in both
    pids = {record["env.pid"] for record in records.values()}
    assert len(pids) == 2 and os.getpid() not in pids
    assert records["bf16"]["params.trainable"] == records["nf4-dq"]["params.trainable"]
    assert records["nf4-dq"]["weights.load.linears.linear4bit_count"] > 0 and records["bf16"]["weights.load.linears.linear4bit_count"] == 0
    assert records["nf4-dq"]["weights.load.base_bytes"] < records["bf16"]["weights.load.base_bytes"]
    assert records["nf4-dq"]["bnb.cpu_weight_packing_disabled_layers"] == records["nf4-dq"]["weights.load.linears.linear4bit_count"]
    table = pd.read_csv(run_dir / "results.csv")
    assert len(table) == 2
    summary = (run_dir / "summary.md").read_text()
    assert "nf4-dq" in summary and "i2t recall@1 after (%)" in summary and "## Verdict" in summary
    manifest = json.loads((run_dir / "run.json").read_text())
    assert [c["cell_id"] for c in manifest["cells"]] == ["bf16-seed0", "nf4-dq-seed0"]


def test_a_bad_suite_exits_2_before_any_cell(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, TWO_CELLS.replace("steps = 4", "step = 4"))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train.step: unknown key (did you mean 'steps'?)" in err
    assert not (tmp_path / "out").exists()
