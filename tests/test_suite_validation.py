"""Bad suites: every mistake is one line naming file and key, exit 2, before torch is imported."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbench import cli
from qbench.contract.suite import Suite, SuiteError, load, parse
from qbench.runner import preflight as checks

from .conftest import REPO, SUITES, examples, write_suite
from .test_suite import MINIMAL


def problems_of(text: str) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    return caught.value.problems


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("steps = 4", "steps = true", "train.steps"),
        ("steps = 4", "steps = 4.0", "train.steps"),
        ("lr = 1e-3", 'lr = "1e-3"', "train.lr"),
        ("lr = 1e-3", "lr = inf", "train.lr"),
        ("lr = 1e-3", "lr = nan", "train.lr"),
        ('id = "builtin:tiny-clip"', 'id = "builtin:tiny-clip"\ntrust_remote_code = 1', "model.trust_remote_code"),
        ('id = "builtin:tiny-clip"', 'id = "builtin:tiny-clip"\nsafetensors_only = "no"', "model.safetensors_only"),
        ('target_modules = ["q_proj"]', 'target_modules = "q_proj"', "lora.target_modules"),
        ('target_modules = ["q_proj"]', "target_modules = []", "lora.target_modules"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(old: str, new: str, key: str):
    problems = problems_of(MINIMAL.replace(old, new))
    assert [p.split(":")[0] for p in problems] == [key]


def test_seeds_must_be_distinct_and_in_range():
    assert problems_of(MINIMAL + "[matrix]\nseeds = [0, 0]\n") == [
        "matrix.seeds: seeds are listed twice (each seed is one cell per precision) (got (0, 0))"
    ]
    (negative,) = problems_of(MINIMAL + "[matrix]\nseeds = [-1]\n")
    assert negative.startswith("matrix.seeds.0: Input should be greater than or equal to 0")
    (empty,) = problems_of(MINIMAL + "[matrix]\nprecisions = []\n")
    assert empty.startswith("matrix.precisions: ")
    assert problems_of(MINIMAL + "[matrix]\nseeds = []\n") == ["matrix.seeds: no seeds: give at least one (got ())"]


def test_recall_k_must_be_positive():
    (problem,) = problems_of(MINIMAL + "[eval]\nrecall_k = [1, 0]\n")
    assert problem.startswith("eval.recall_k.1: Input should be greater than or equal to 1")


def test_a_misspelt_precision_gets_the_closest_known_one():
    (problem,) = problems_of(MINIMAL + '[matrix]\nprecisions = ["bf16", "nf4dq"]\n')
    assert "unknown precision(s) 'nf4dq' (did you mean 'nf4-dq'?)" in problem
    (problem,) = problems_of(MINIMAL.replace('task = "clip"', 'task = "clip"\nbaseline = "bf61"'))
    assert problem.startswith("baseline: 'bf61' is not a known precision (did you mean 'bf16'?)")


def test_an_unknown_top_level_key_and_section_key_are_both_named():
    problems = problems_of(MINIMAL.replace('task = "clip"', 'task = "clip"\ndescripton = "x"') + "[eval]\nbatchsize = 2\n")
    assert sorted(problems) == [
        "descripton: unknown key (did you mean 'description'?)",
        "eval.batchsize: unknown key (did you mean 'batch_size'?)",
    ]


def test_a_section_wide_check_does_not_dump_the_whole_table():
    (problem,) = problems_of(MINIMAL.replace('kind = "builtin"\nname = "shapes"', 'kind = "tsv"\ntrain = "a.tsv"'))
    assert problem == "data: data.kind = 'tsv' needs data.train and data.eval"


def test_a_huge_value_is_shortened_in_the_message():
    (problem,) = problems_of(MINIMAL.replace("lr = 1e-3", f'lr = "{"9" * 500}"'))
    assert problem.startswith("train.lr: Input should be a valid number") and len(problem) < 160


def test_nesting_too_deep_for_the_parser_is_a_suite_error():
    (problem,) = problems_of(MINIMAL + "[matrix]\nseeds = " + "[" * 3000 + "]" * 3000 + "\n")
    assert problem.startswith("TOML syntax error")


def test_a_suite_file_that_is_not_utf8_a_folder_or_missing_is_named(tmp_path: Path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(MINIMAL.replace('"t"', '"caf\xe9"').encode("latin-1"))
    for path, expected in (
        (latin, "the suite file is not UTF-8 text (byte 12)"),
        (tmp_path, "cannot read the suite file: Is a directory"),
        (tmp_path / "absent.toml", "cannot read the suite file: No such file or directory"),
    ):
        with pytest.raises(SuiteError) as caught:
            load(path)
        assert caught.value.problems == [expected] and str(caught.value).startswith(str(path))


def test_bad_command_line_values_exit_2_with_one_line(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, MINIMAL)
    assert cli.main(["run", str(suite), "--seeds", "0,x"]) == 2
    assert capsys.readouterr().err.strip() == "error: command line: --seeds: '0,x' is not a comma-separated list of integers"
    assert cli.main(["run", str(suite), "--seeds", "1,1"]) == 2
    assert capsys.readouterr().err.strip() == "error: command line: --seeds: '1,1' must be distinct integers from 0 to 2**32-1"
    assert cli.main(["run"]) == 2
    assert "needs a suite file" in capsys.readouterr().err


def test_brackets_in_a_problem_are_printed_as_they_are(tmp_path: Path, capsys):
    """Rich markup in user text must neither vanish nor crash the error printer."""
    suite = write_suite(tmp_path, MINIMAL.replace('name = "t"', 'name = "[/bold] [red]x"'))
    assert cli.main(["run", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "name: String should match pattern" in err and "'[/bold] [red]x'" in err


# -- property: the loader only ever returns a suite or raises SuiteError -------------------------


def _toml_value(value) -> str:
    """A TOML literal (inline tables for dicts) of what the strategies below produce."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml(document: dict) -> str:
    return "\n".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}" for k, v in document.items()) + "\n"


KEYS = sorted(
    {"name", "task", "model", "data", "lora", "train", "eval", "matrix", "id", "kind", "steps", "lr", "r", "seeds"}
    | set(Suite.model_fields)
)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["bf16", "nf4", "clip", "causal_lm", "builtin", "tsv", "q_proj", "cosine", "builtin:tiny-clip"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=4)
    ),
    max_leaves=12,
)
VALID = [tomllib.loads(MINIMAL)] + [tomllib.loads(p.read_text(encoding="utf-8")) for p in sorted(SUITES.glob("*.toml"))]


@st.composite
def mutated_suites(draw) -> dict:
    """A valid suite with a few keys deleted, renamed or given random values, at any depth."""
    document = json.loads(json.dumps(draw(st.sampled_from(VALID)), default=str))
    for _ in range(draw(st.integers(1, 4))):
        table, tables = document, []
        while True:
            tables.append(table)
            nested = [k for k, v in table.items() if isinstance(v, dict)]
            if not nested or draw(st.booleans()):
                break
            table = table[draw(st.sampled_from(nested))]
        table = draw(st.sampled_from(tables))
        action = draw(st.sampled_from(["delete", "rename", "replace", "add"]))
        if action == "add" or not table:
            table[draw(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8)))] = draw(values)
            continue
        key = draw(st.sampled_from(sorted(table)))
        if action == "delete":
            del table[key]
        elif action == "rename":
            table[key + draw(st.sampled_from(["s", "_", "x"]))] = table.pop(key)
        else:
            table[key] = draw(values)
    return document


def _loads_or_refuses(text: str, folder: Path) -> None:
    try:
        suite = parse(text, "fuzz.toml")
    except SuiteError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)
        return
    assert isinstance(suite, Suite)
    # a suite that validates also gets through the file checks without a traceback
    path = folder / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    try:
        checks.check_suite(load(path), check_model=False)
    except SuiteError as error:
        assert error.problems


FUZZ = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(document=st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), values, max_size=6))
def test_random_documents_give_a_suite_or_a_suite_error(document: dict, tmp_path: Path):
    _loads_or_refuses(_toml(document), tmp_path)


@FUZZ
@given(document=mutated_suites())
def test_mutated_suites_give_a_suite_or_a_suite_error(document: dict, tmp_path: Path):
    _loads_or_refuses(_toml(document), tmp_path)


@FUZZ
@given(base=st.sampled_from([MINIMAL] + [p.read_text(encoding="utf-8") for p in sorted(SUITES.glob("*.toml"))]), data=st.data())
def test_randomly_edited_suite_text_gives_a_suite_or_a_suite_error(base: str, data, tmp_path: Path):
    text = base
    for _ in range(data.draw(st.integers(1, 5))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 4))
        text = text[:at] + data.draw(st.text(alphabet='[]{}="\n.,=#-0123456789abcdefgtrue ', max_size=3)) + text[at + cut :]
    _loads_or_refuses(text, tmp_path)


# -- every committed suite, with one typo: exit 2, one line per problem, no torch -----------------

PROBE = """
import sys, time
started = time.perf_counter()
from qbench.cli import main
code = main(["run", sys.argv[1], "--out", sys.argv[2]])
print("IMPORTED", sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes") if m in sys.modules))
print("SECONDS", time.perf_counter() - started)
sys.exit(code)
"""


def with_key_typo(text: str) -> tuple[str, str, str]:
    """The suite with the first key of its [train] section misspelt: (text, key, typo)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\s*\[\s*train\s*\]", line))
    for index in range(start + 1, len(lines)):
        match = re.match(r"^(\s*)([A-Za-z_]+)(\s*=.*)$", lines[index])
        if match:
            key = match.group(2)
            typo = key[:-1] + key[-1] * 2
            lines[index] = match.group(1) + typo + match.group(3)
            return "\n".join(lines) + "\n", key, typo
    raise AssertionError("no key in [train]")


@pytest.mark.parametrize("suite_file", sorted(SUITES.glob("*.toml")), ids=lambda p: p.name)
def test_every_suite_with_a_typo_fails_fast_with_one_line_per_problem(suite_file: Path, tmp_path: Path):
    text, key, typo = with_key_typo(suite_file.read_text(encoding="utf-8"))
    broken = tmp_path / suite_file.name  # same folder depth is irrelevant: structure fails before paths are checked
    broken.write_text(text, encoding="utf-8")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(broken), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert probe.returncode == 2, probe.stderr
    lines = probe.stderr.splitlines()
    assert lines and all(line.startswith(f"error: {broken}: ") for line in lines), probe.stderr
    assert f"error: {broken}: train.{typo}: unknown key (did you mean '{key}'?)" in lines
    assert "Traceback" not in probe.stderr
    assert "IMPORTED []" in probe.stdout  # nothing heavy was imported before the structural check failed
    assert not (tmp_path / "out").exists()
