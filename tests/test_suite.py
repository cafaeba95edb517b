from pathlib import Path

import pytest

from qbench.contract.suite import SuiteError, load, parse

from .conftest import SUITES
from .helpers import clip

MINIMAL = clip.suite(name="t", precisions=None, steps=4, train="lr = 1e-3", lora='target_modules = ["q_proj"]', evaluation=None)


def problems_of(text: str) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    return caught.value.problems


def test_minimal_suite_gets_defaults():
    suite = parse(MINIMAL)
    assert suite.matrix.precisions == ("dense", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq")
    assert suite.lora.r == 16 and suite.train.batch_size == 32
    # the dense arm in whatever the device computes natively, and that arm is the baseline
    assert suite.compute_dtype == "auto" and suite.baseline == "dense" and suite.threads is None


def test_without_a_baseline_key_the_matrix_s_dense_arm_is_the_baseline():
    assert parse(MINIMAL + '[matrix]\nprecisions = ["nf4", "bf16"]\n').baseline == "bf16"
    assert parse(MINIMAL + '[matrix]\nprecisions = ["fp32", "dense", "nf4"]\n').baseline == "dense"
    assert problems_of(MINIMAL + '[matrix]\nprecisions = ["nf4", "int8"]\n')[0].startswith("baseline: 'dense' (the default) is not in")
    assert parse('baseline = "nf4"\n' + MINIMAL + '[matrix]\nprecisions = ["nf4", "bf16"]\n').baseline == "nf4"


def test_threads_is_a_positive_suite_setting():
    assert parse(MINIMAL.replace('task = "clip"', 'task = "clip"\nthreads = 2')).threads == 2
    assert problems_of(MINIMAL.replace('task = "clip"', 'task = "clip"\nthreads = 0'))[0].startswith("threads:")


def test_every_committed_suite_validates():
    for path in sorted(SUITES.glob("*.toml")):
        load(path)


def test_unknown_key_is_named_with_closest_valid_key():
    problems = problems_of(MINIMAL.replace("lr = 1e-3", "lr = 1e-3\nwarmup_step = 3"))
    assert problems == ["train.warmup_step: unknown key (did you mean 'warmup_steps'?)"]


def test_wrong_type_and_range_are_reported_together():
    problems = problems_of(MINIMAL.replace("steps = 4", "steps = 'four'").replace("target_modules", "r = 0\ntarget_modules"))
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["lora.r", "train.steps"]


def test_unknown_precision_is_rejected_with_the_known_ones():
    problems = problems_of(MINIMAL + '[matrix]\nprecisions = ["bf16", "nf3"]\n')
    assert len(problems) == 1 and "'nf3'" in problems[0] and "nf4-dq" in problems[0]


def test_toml_syntax_error_names_the_line():
    problems = problems_of(MINIMAL + "[matrix\n")
    assert "TOML syntax error" in problems[0] and "line 14" in problems[0]


def test_missing_required_section_is_named():
    problems = problems_of(MINIMAL.replace("[lora]\ntarget_modules = [\"q_proj\"]\n", ""))
    assert problems == ["lora: required key is missing"]


def test_cells_are_precisions_times_seeds_and_only_filters(tmp_path: Path):
    path = tmp_path / "s.toml"
    path.write_text(MINIMAL + '[matrix]\nprecisions = ["bf16", "nf4"]\nseeds = [0, 1]\n')
    loaded = load(path)
    assert [c.id for c in loaded.cells()] == ["bf16-seed0", "nf4-seed0", "bf16-seed1", "nf4-seed1"]
    assert [c.id for c in loaded.cells(only=("nf4",), seeds=(3,))] == ["nf4-seed3"]


def test_untimed_steps_must_leave_timed_steps():
    problems = problems_of(MINIMAL.replace("lr = 1e-3", "lr = 1e-3\nuntimed_steps = 4"))
    assert "untimed_steps (4) must be below steps (4)" in problems[0]
