"""The perplexity protocol is named and selectable: eval.protocol = "disjoint" (qbench's windows side by side) or
"rolling" (lm-evaluation-harness's loglikelihood_rolling: BOS in front, every token scored, the last window filled
with context); records say which, and the rolling one equals lm-eval's on the same text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.cell.tasks.causal_lm import IGNORE, disjoint_ranges, make_windows, range_bytes, rolling_windows

REPO = Path(__file__).resolve().parents[1]


def test_rolling_windows_are_lm_evals_and_score_every_token_once():
    windows, ranges = rolling_windows(list(range(1, 11)), window=4, prefix_id=0, pad_id=99)
    assert windows.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert windows.labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [IGNORE, IGNORE, 9, 10]]
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    assert windows.scored_tokens == 10  # the first token too, after the prefix
    short, _ = rolling_windows([5, 6], window=4, prefix_id=0, pad_id=99)
    assert short.input_ids.tolist() == [[0, 5, 99, 99]] and short.attention_mask.tolist() == [[1, 1, 0, 0]]


def test_disjoint_windows_leave_the_first_token_unscored():
    windows = make_windows(list(range(1, 11)), window=4, pad_id=0)
    assert windows.scored_tokens == 9
    assert disjoint_ranges(10, 4) == [(1, 5), (5, 9), (9, 10)]


def test_the_byte_spans_of_a_protocols_windows_partition_the_text_they_score():
    text = " ab cd ef gh"
    starts = [0, 3, 6, 9]  # four tokens: " ab", " cd", " ef", " gh"
    rolling = sum(range_bytes(text, starts, a, b) for a, b in [(0, 2), (2, 4)])
    disjoint = sum(range_bytes(text, starts, a, b) for a, b in disjoint_ranges(4, 2))
    assert rolling == len(text) and disjoint == len(text) - 3  # the disjoint protocol does not score " ab"


def _perplexity_records(tmp_path: Path, protocol: str) -> dict:
    from qbench.cell.tasks import get_task
    from qbench.cell.tasks.causal_lm import CausalLMTask
    from qbench.contract.suite import LoadedSuite, parse

    from .test_load_report import suite_text

    text = suite_text("builtin:tiny-llama", "", '["dense"]').replace(
        "max_windows = 12", f'max_windows = 12\nprotocol = "{protocol}"')
    loaded = LoadedSuite(parse(text, "s.toml"), tmp_path / "s.toml", "0" * 64, text)
    from qbench.cell import models

    task = get_task(loaded, models.resolve("builtin:tiny-llama"), "cpu")
    assert isinstance(task, CausalLMTask)
    return task.prepare_data()


def test_records_name_the_protocol_and_the_rolling_one_scores_the_window_starts(tmp_path):
    disjoint, rolling = _perplexity_records(tmp_path, "disjoint"), _perplexity_records(tmp_path, "rolling")
    assert disjoint["eval.protocol"].startswith("disjoint: ") and rolling["eval.protocol"].startswith("rolling: lm-evaluation-harness")
    assert rolling["eval.prefix_token_id"] is not None and disjoint["eval.prefix_token_id"] is None
    # 12 of the windows spread over the text: each scores 64 tokens but the text's last one, which scores what is left
    scored = rolling["per_window.scored_tokens"]
    assert scored[:-1] == [64] * 11 and 0 < scored[-1] <= 64 and sum(scored) == rolling["eval.scored_tokens"]
    assert rolling["eval.available_windows"] == disjoint["eval.available_windows"]


def _lm_eval_python() -> str | None:
    """A Python with lm_eval installed: $QBENCH_LM_EVAL_PYTHON, or this one if it has lm_eval."""
    if os.environ.get("QBENCH_LM_EVAL_PYTHON"):
        return os.environ["QBENCH_LM_EVAL_PYTHON"]
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return None
    return sys.executable


@pytest.mark.slow
@pytest.mark.skipif(_lm_eval_python() is None, reason="lm_eval is not installed (set QBENCH_LM_EVAL_PYTHON to a Python that has it)")
def test_rolling_perplexity_equals_lm_evaluation_harness_within_a_hundredth_of_a_percent():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([_lm_eval_python(), str(REPO / "scripts" / "check_lm_eval_rolling.py"), "--window", "64"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "relative difference" in done.stdout


def test_a_protocol_is_refused_where_there_is_no_perplexity():
    from qbench.contract.suite import SuiteError, parse

    from .helpers import clip

    with pytest.raises(SuiteError) as caught:
        parse(clip.suite(evaluation='batch_size = 64\nprotocol = "rolling"'), "s.toml")
    assert any(p.startswith("eval.protocol: a perplexity window protocol") for p in caught.value.problems)


def test_the_report_names_the_protocol_and_the_negatives():
    import pandas as pd

    from qbench.analysis.report.sections import measured_how

    lm = pd.DataFrame({"eval.protocol": ["rolling: lm-evaluation-harness's loglikelihood_rolling ..."] * 2})
    assert measured_how(lm) == ["Evaluation protocol: rolling: lm-evaluation-harness's loglikelihood_rolling ...."]
    clip = pd.DataFrame({"eval.protocol": ["recall@k ..."], "train.negatives_per_query": [7], "train.contrastive_batch": ["micro_batch"]})
    assert measured_how(clip)[1] == "Negatives per query in training: 7 (each micro-batch's own pairs)."
