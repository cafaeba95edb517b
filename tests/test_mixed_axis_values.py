"""Axis and identity values of mixed types in records (a rank as text beside numbers, a seed as a float, a list
where one value belongs) never break the report or compare: they are ordered without comparing unlike types,
placed on a numeric axis only when they are numbers, and a list or object where one value belongs makes the
record one qbench did not write."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qbench import cli
from qbench.analysis import stats
from qbench.analysis.report import grid
from qbench.contract import records

from .conftest import examples
from .records import make_record, write_run

ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 64), st.floats(allow_infinity=True), st.text(max_size=6))
AXIS_KEYS = ("config.lora.r", "config.train.batch_size", "config.train.optimizer", "config.train.gradient_checkpointing", "seed")


def test_values_of_every_type_sort_together():
    values = ["sixteen", 16, 8.0, True, None, float("nan"), False, "eight", (1, 2)]
    ordered = sorted(values, key=stats.value_order)
    assert ordered[:2] == [8.0, 16] and ordered[2:4] == [False, True] and ordered[4:6] == ["eight", "sixteen"]
    assert ordered[6] == (1, 2) and ordered[7] is None and math.isnan(ordered[8])
    assert [stats.is_number(v) for v in (16, 8.5, True, "16", float("inf"), None)] == [True, True, False, False, False, False]


def test_a_list_where_one_value_belongs_is_not_a_record_qbench_wrote():
    problem = records.record_problem({**make_record("int8"), "config.lora.r": [16]})
    assert problem and "config.lora.r" in problem and "[16]" in problem  # the record model wants one integer there
    assert records.record_problem({**make_record("int8"), "per_window.scored_tokens": [16, 16]}) is None  # lists belong there


@settings(max_examples=examples(5), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(AXIS_KEYS), value=ODD_VALUES)
@example(key="config.lora.r", value="sixteen")  # issue 28: '<' not supported between instances of 'str' and 'int'
@example(key="config.lora.r", value=16.5)
@example(key="seed", value="0")
def test_the_report_and_compare_take_mixed_axis_values(key, value, tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("mixed")
    run = write_run(root / "run", [make_record("bf16"), {**make_record("int8"), key: value},
                                   make_record("nf4-dq", **{"config.lora.r": 8, "config.train.batch_size": 4})])
    assert cli.main(["report", str(run), "--out", str(root / "report")]) in (0, 1, 2)
    assert cli.main(["compare", str(run), str(run)]) in (0, 1, 2)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("rank", ["sixteen", 16.5, None])
def test_a_rank_that_is_no_number_is_left_off_the_numeric_axis(rank):
    import pandas as pd

    frame = pd.DataFrame([make_record("bf16"), make_record("int8", **{"config.lora.r": rank}), make_record("nf4-dq", **{"config.lora.r": 8})])
    plots = grid.scaling_plots(frame)
    assert [p.name for p in plots] == ["scaling_lora_r"]
