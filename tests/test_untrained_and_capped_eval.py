"""train.steps = 0 (the quantized base alone: no train phase, and its figures absent with a reason, never zero)
and eval.max_windows (perplexity on windows spread over the whole held-out text, bits per byte over their bytes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qbench import cli
from qbench.cell.tasks.causal_lm import evaluate_perplexity, make_windows, scored_bytes, select_windows, spread_windows
from qbench.contract.suite import parse

from .conftest import write_suite
from .helpers import suites
from .helpers.schema import assert_schema_3_run
from .test_suite import MINIMAL, problems_of


def llm(steps: int, max_windows: int) -> str:
    return suites.causal_lm(
        name="untrained", steps=steps, train="batch_size = 4\nlr = 1e-3\nmax_length = 32",
        evaluation=f"window = 64\nmax_windows = {max_windows}",
    )


def test_zero_steps_is_a_valid_suite_whatever_untimed_steps_says():
    suite = parse(MINIMAL.replace("steps = 4", "steps = 0"))
    assert suite.train.steps == 0 and suite.train.untimed_steps == 2


def test_zero_steps_without_evaluation_before_is_refused():
    problems = problems_of(MINIMAL.replace("steps = 4", "steps = 0") + "[eval]\nbefore = false\n")
    assert len(problems) == 1 and "train.steps = 0" in problems[0] and "eval.before = true" in problems[0]


def test_negative_steps_are_still_refused():
    assert [p.split(":")[0] for p in problems_of(MINIMAL.replace("steps = 4", "steps = -1"))] == ["train.steps"]


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """One real run of the tiny Llama with train.steps = 0 and eval.max_windows = 3, read by the tests below."""
    folder = tmp_path_factory.mktemp("untrained")
    suite = write_suite(folder, llm(steps=0, max_windows=3))
    assert cli.main(["run", str(suite), "--out", str(folder / "out"), "--device", "cpu"]) == 0
    return next((folder / "out" / "untrained").iterdir())


def test_zero_steps_runs_no_train_phase_and_leaves_its_figures_absent_with_the_reason(untrained_run: Path, tmp_path: Path):
    run_dir = untrained_run
    assert len(assert_schema_3_run(run_dir)) == 2
    for path in sorted((run_dir / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        assert record["status"] == "ok"
        assert record["quality.eval_before.perplexity"] > 1
        assert not any(key.startswith("memory.train.") for key in record)  # the phase never ran
        for key in ("speed.train_samples_per_s", "speed.train_tokens_per_s", "speed.step_time_p50_s", "time.train.wall_s",
                    "train.final_loss", "quality.eval_after.perplexity", "quality.eval_after.bits_per_byte"):
            assert record[key] is None, key
        assert record["train.steps_completed"] == 0
        # each window's summed NLL, for comparisons paired over the same windows (qbench/analysis/report/paper.py)
        sums, tokens = record["per_window.eval_before.window_nll"], record["per_window.scored_tokens"]
        assert len(sums) == len(tokens) == record["eval.windows"] and sum(tokens) == record["eval.scored_tokens"]
        assert math.fsum(sums) / sum(tokens) == pytest.approx(record["quality.eval_before.nll_per_token"], rel=1e-9)
        assert "per_window.eval_after.window_nll" not in record
        for key in ("speed.absent_reason", "train.absent_reason", "quality.eval_after_absent_reason"):
            assert "train.steps = 0" in record[key]
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "quality after fine-tuning (train.steps > 0)" in report  # the paper's recovery line says what it needs


def test_spread_windows_keep_the_first_and_last_and_are_even():
    assert spread_windows(10, None) == list(range(10))
    assert spread_windows(10, 20) == list(range(10))
    assert spread_windows(10, 4) == [0, 3, 6, 9]
    assert spread_windows(117, 64)[:3] == [0, 2, 4] and spread_windows(117, 64)[-1] == 116
    assert len(spread_windows(117, 64)) == 64
    assert spread_windows(5, 1) == [0]


def test_scored_bytes_of_all_windows_cover_the_text_after_the_first_token_once():
    from transformers import AutoTokenizer

    from qbench.cell import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve("builtin:tiny-llama"))
    text = "Déjà vu:  the  str.upper() method returns a copy.\n\n  Indented — and ünïcode too.  "
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    window = 4
    count = make_windows(encoded["input_ids"], window, 0).input_ids.shape[0]
    every = scored_bytes(text, starts, window, list(range(count)))
    assert every == len(text[starts[1]:].encode("utf-8"))
    parts = [scored_bytes(text, starts, window, [k]) for k in range(count)]
    assert sum(parts) == every and all(p > 0 for p in parts)


def test_perplexity_of_chosen_windows_is_that_of_those_windows_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)).eval()
    tokens = [3, 7, 1, 12, 5, 5, 9, 2, 11, 4, 6, 8, 1, 2, 3, 4, 5]
    windows = make_windows(tokens, 4, pad_id=0)
    chosen = spread_windows(windows.input_ids.shape[0], 2)
    assert chosen == [0, 3]
    got = evaluate_perplexity(model, select_windows(windows, chosen), 10, batch_size=8, device="cpu").metrics
    nll = 0.0
    for k in chosen:
        one = select_windows(windows, [k])
        nll += evaluate_perplexity(model, one, 10, batch_size=1, device="cpu").metrics["nll_per_token"] * one.scored_tokens
    assert got["perplexity"] == pytest.approx(math.exp(nll / 8), rel=1e-5)


def test_max_windows_is_recorded_with_the_protocol(untrained_run: Path):
    record = json.loads((untrained_run / "cells" / "bf16-seed0.json").read_text())
    assert record["eval.windows"] == 3 and record["eval.available_windows"] > 3
    assert 2 * 64 < record["eval.scored_tokens"] <= 3 * 64  # the last window of the text is one of the three
    assert "3 of the held-out text's" in record["eval.protocol"]
    assert 0 < record["eval.bytes"] < record["data.eval_chars"] * 4
