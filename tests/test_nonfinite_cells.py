"""Cells whose model gives NaN or infinite outputs in evaluation, through `qbench run` (issue 11, kind 1).

CLIP: a tiny checkpoint whose patch embedding is scaled up, so bright eval images overflow float16
(as openai/CLIP#222 reports) while bf16 stays finite and the grey training images stay finite in both;
an nf4 arm gets NaN planted in its image embeddings after fine-tuning (QBENCH_TEST_FAULTS, tests/helpers/faulty_cell.py). Causal LM:
an nf4 arm gets NaN planted in its logits after fine-tuning, under k-bit preparation. Both run with
DataLoader workers, so the memory figures of a process tree are checked on the way.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis import load
from qbench.analysis.gate import compare
from qbench.analysis.report.findings import nonfinite_findings
from qbench.contract import records as results

from .conftest import write_suite
from .helpers import clip, suites
from .records import make_records

MiB = 1024 * 1024


def test_findings_say_in_words_which_cell_broke_how_often_and_what_it_does_to_the_metric():
    records = make_records()
    for record in records:
        record.update({"data.eval_images": 12, "quality.eval_before.nonfinite_image_embeddings": 0,
                       "quality.eval_after.nonfinite_image_embeddings": 0})
    records[1].update({"quality.eval_before.nonfinite_image_embeddings": 8, "quality.eval_after.nonfinite_image_embeddings": 3})
    (line,) = nonfinite_findings(pd.DataFrame(records))
    assert line.startswith("int8-seed0:")
    assert "8 of 12 image embeddings before fine-tuning" in line and "3 of 12 image embeddings after fine-tuning" in line
    assert "never counts as a match" in line
    assert nonfinite_findings(pd.DataFrame(make_records())) == []


def _clip_inputs(folder: Path) -> tuple[Path, dict[str, Path]]:
    import torch
    from transformers import CLIPModel

    checkpoint = clip.checkpoint(folder / "checkpoint", image_size=32, patch_size=8)
    model = CLIPModel.from_pretrained(checkpoint)
    weight = model.vision_model.embeddings.patch_embedding.weight
    torch.manual_seed(0)
    with torch.no_grad():
        weight.add_(200 * (torch.rand(weight.shape[0], 1, 1, 1) + 0.5))  # white images overflow float16, grey do not
    model.save_pretrained(checkpoint)
    images = folder / "data" / "images"
    images.mkdir(parents=True)
    lines: dict[str, list[str]] = {"train": [], "eval": []}
    for colour in clip.COLOURS:
        for shape in clip.SHAPES:  # training on grey: finite in float16 too, so every arm trains
            clip.draw(shape, colour, "gray", 32).save(images / f"train-{colour}-{shape}.png")
            lines["train"].append(f"train-{colour}-{shape}.png\ta {colour} {shape} on a gray background")
        for background in ("white", "gray"):
            clip.draw("circle", colour, background, 32, shift=1).save(images / f"eval-{colour}-{background}.png")
            lines["eval"].append(f"eval-{colour}-{background}.png\ta {colour} circle on a {background} background")
    paths = {"images": images}
    for split, split_lines in lines.items():
        paths[split] = folder / "data" / f"{split}.tsv"
        paths[split].write_text("\n".join(split_lines) + "\n", encoding="utf-8")
    return checkpoint, paths


# each cell holds its train phase a second at its first step, its DataLoader workers alive: the sampler lists the
# process tree every 0.1 s, and a few tiny steps on a quiet machine can end before it has seen every worker
HOLD_TRAIN = "*:train:sleep:1"


def _run(tmp_path: Path, text: str, faulty_cells, fault: str) -> tuple[int, Path, dict]:
    faulty_cells(f"{fault},{HOLD_TRAIN}")
    code = cli.main(["run", str(write_suite(tmp_path, text)), "--out", str(tmp_path / "out"), "--device", "cpu"])
    (run_dir,) = (p for p in (tmp_path / "out").glob("*/*") if p.is_dir())
    return code, run_dir, {r["precision"]: r for r in results.read_records(run_dir)}


def _assert_intervals(record: dict, phase: str, names: list[str]) -> None:
    for name in names:
        value = record[f"quality.{phase}.{name}"]
        low, high, se = (record[f"interval.{phase}.{name}.{part}"] for part in ("low", "high", "se"))
        assert low <= value <= high and se >= 0, (name, low, value, high)
    assert record["interval.resamples"] == 1000 and record["interval.confidence"] == 0.95


def _assert_tree_memory(record: dict, workers: int) -> None:
    assert record["memory.train.tree_processes_max"] == 1 + workers
    assert record["memory.train.pss_peak_bytes"] > 100 * MiB and record["memory.train.pss_reads"] >= 1
    # the workers are forks sharing the cell's pages: the tree's PSS stays near the cell's own RSS,
    # where a sum of RSS over the tree would be about (1 + workers) times it
    assert record["memory.train.pss_peak_bytes"] < 1.5 * record["memory.train.rss_peak_bytes"]
    assert record["memory.all_phases.pss_peak_bytes"] == max(
        record[f"memory.{p}.pss_peak_bytes"] for p in ("data", "load", "prepare", "eval_before", "train", "eval_after")
        if f"memory.{p}.pss_peak_bytes" in record
    )


@pytest.mark.slow
def test_clip_float16_overflow_and_planted_nan_are_counted_never_hits_and_flagged(tmp_path, faulty_cells, capsys):
    checkpoint, data = _clip_inputs(tmp_path)
    text = clip.suite(checkpoint, data, ("bf16", "fp16", "nf4"), name="nanclip", data_extra="num_workers = 2",
                      evaluation="batch_size = 64\nrecall_k = [1, 5]")
    code, run_dir, records = _run(tmp_path, text, faulty_cells, "nf4-seed0:eval_after:nan:3")
    assert code == 0 and all(r["status"] == "ok" for r in records.values()), {p: r.get("error") for p, r in records.items()}
    bf16, fp16, nf4 = records["bf16"], records["fp16"], records["nf4"]
    for phase in ("eval_before", "eval_after"):
        assert bf16[f"quality.{phase}.nonfinite_image_embeddings"] == 0
        assert bf16[f"quality.{phase}.nonfinite_text_embeddings"] == 0
        # the 4 images on white overflow float16, the 4 on grey do not
        assert fp16[f"quality.{phase}.nonfinite_image_embeddings"] == 4
        # a NaN image can find nothing and be found by nothing: at most the 4 finite images / their captions hit
        for direction in ("i2t", "t2i"):
            assert fp16[f"quality.{phase}.{direction}_recall@5"] <= 4 / 8
        _assert_intervals(fp16, phase, ["i2t_recall@1", "t2i_recall@1", "mean_recall@1", "mean_recall@5"])
    assert nf4["quality.eval_before.nonfinite_image_embeddings"] == 0 and nf4["quality.eval_after.nonfinite_image_embeddings"] == 3
    assert nf4["quality.eval_after.i2t_recall@5"] <= 5 / 8
    assert nf4["data.eval_duplicate_captions"] == 0
    for record in records.values():
        _assert_tree_memory(record, workers=2)
    summary = (run_dir / "summary.md").read_text()
    assert "## Non-finite model outputs" in summary
    assert "fp16-seed0: the model's outputs were NaN or infinite" in summary and "nf4-seed0" in summary
    assert "bf16-seed0: the model" not in summary
    captured = capsys.readouterr()
    assert "4 of 8 image embeddings" in captured.out + captured.err  # the terminal says it too

    # the gate: a baseline where these arms were finite, against this run
    frame = load.load_frame([run_dir])
    healthy = frame.copy()
    for column in [c for c in frame.columns if ".nonfinite_" in c]:
        healthy[column] = 0
    gated = compare.compare(healthy, frame)
    rows = gated.regressions[gated.regressions["metric"].str.contains("nonfinite")]
    assert set(zip(rows["precision"], rows["metric"], strict=True)) == {
        ("fp16", "quality.eval_before.nonfinite_image_embeddings"), ("fp16", "quality.eval_after.nonfinite_image_embeddings"),
        ("nf4", "quality.eval_after.nonfinite_image_embeddings"),
    }


LLM_SUITE = suites.causal_lm(
    precisions=("fp32", "nf4"), name="nanlm",
    # a 16-bit base that k-bit preparation widens (auto measures float32 on some CPUs)
    settings='compute_dtype = "bfloat16"\nbaseline = "fp32"',
    lora='r = 4\nalpha = 8\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]', steps=3,
    train='batch_size = 4\nlr = 1e-3\nmax_length = 64\nuntimed_steps = 1\nprepare = "peft-kbit"', evaluation="batch_size = 16\nwindow = 64",
)


@pytest.mark.slow
def test_causal_lm_planted_nan_logits_make_perplexity_infinite_and_k_bit_preparation_is_read_back(tmp_path, faulty_cells):
    code, run_dir, records = _run(tmp_path, LLM_SUITE, faulty_cells, "nf4-seed0:eval_after:nan:2")
    assert code == 0 and all(r["status"] == "ok" for r in records.values()), {p: r.get("error") for p, r in records.items()}
    fp32, nf4 = records["fp32"], records["nf4"]
    metrics = ["perplexity", "nll_per_token", "bits_per_byte"]
    for record in (fp32, nf4):
        assert record["quality.eval_before.nonfinite_logits"] == 0 and record["quality.eval_before.nonfinite_losses"] == 0
        _assert_intervals(record, "eval_before", metrics)
        assert record["interval.method"].startswith("percentile bootstrap over eval windows")
        assert record["memory.train.tree_processes_max"] == 1  # the LM task reads its text in-process
    _assert_intervals(fp32, "eval_after", metrics)
    assert nf4["quality.eval_after.nonfinite_logits"] == 2 and nf4["quality.eval_after.nonfinite_losses"] == 2
    assert nf4["quality.eval_after.perplexity"] == math.inf and nf4["quality.eval_after.bits_per_byte"] == math.inf
    assert nf4["interval.eval_after.perplexity.low"] is None and "non-finite" in nf4["interval.eval_after.perplexity.note"]
    # k-bit preparation: fp32 stays fp32; nf4 keeps its codes, its norms and embeddings became float32
    assert fp32["weights.prepare.base_bytes"] == fp32["weights.load.base_bytes"]
    assert nf4["weights.prepare.quantized_codes_bytes"] == nf4["weights.load.quantized_codes_bytes"]
    assert nf4["weights.load.unquantized_param_dtypes"] == "bfloat16" and nf4["weights.prepare.unquantized_param_dtypes"] == "float32"
    assert nf4["weights.prepare.base_bytes"] > nf4["weights.load.base_bytes"]
    summary = (run_dir / "summary.md").read_text()
    assert "nf4-seed0: the model's outputs were NaN or infinite in evaluation — 2 of" in summary
    assert "perplexity and bits per byte infinite" in summary and "fp32-seed0: the model" not in summary
