"""Inputs that cannot give the result asked for stop before any cell with exit 2 and one line each: empty
lists, a baseline outside the matrix, sizes past their bounds (each with its reason), a batch larger than
the data or the machine, text corpora a cell could not use, and echoed user text that could split a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract.suite import SuiteError, parse

from .conftest import write_suite
from .helpers import clip, executors, suites
from .test_suite import MINIMAL


def problems_of(text: str) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    return caught.value.problems


def run(tmp_path: Path, suite: Path, *options: str) -> int:
    """A real `qbench run`: whatever it refuses must be refused before a run folder exists (and before any cell)."""
    with pytest.MonkeyPatch.context() as patch:
        executors.use(patch, executors.NO_CELL)
        code = cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu", *options])
    if code == 2:
        assert not (tmp_path / "out").exists()
    return code


# -- lists that are empty or name what is not there ------------------------------------------------


def test_an_empty_recall_k_is_refused_rather_than_running_with_no_quality_metric():
    assert problems_of(MINIMAL + "[eval]\nrecall_k = []\n") == [
        "eval.recall_k: no k: give at least one (e.g. [1, 5, 10]); without one a clip cell measures no quality (got ())"
    ]
    (twice,) = problems_of(MINIMAL + "[eval]\nrecall_k = [5, 5]\n")
    assert twice.startswith("eval.recall_k: a k is listed twice")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--only", ""], "--only: an empty list of precisions (got ''); name at least one of the matrix, or leave --only out"),
        (["--only", "bf16,"], "--only: an empty name in 'bf16,'"),
        (["--seeds", ""], "--seeds: '' is not a comma-separated list of integers"),
        (["--shard", ""], "--shard: expected I/N such as 1/2 (got '')"),
        (["--gpus", ""], "--gpus: expected a comma-separated list of GPU indices such as 0,1,2,3 (got '')"),
    ],
)
def test_an_empty_command_line_list_is_an_error_not_everything(tmp_path: Path, capsys, options: list[str], message: str):
    suite = write_suite(tmp_path, MINIMAL)
    assert run(tmp_path, suite, *options) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert message in line


def test_a_baseline_outside_the_matrix_is_refused():
    (problem,) = problems_of(MINIMAL.replace('task = "clip"', 'task = "clip"\nbaseline = "fp32"') + '[matrix]\nprecisions = ["bf16"]\n')
    assert problem.startswith("baseline: 'fp32' is not in matrix.precisions (bf16): every ratio and delta is taken against")
    (default,) = problems_of(MINIMAL + '[matrix]\nprecisions = ["nf4", "int8"]\n')
    assert default.startswith("baseline: 'dense' (the default) is not in matrix.precisions (nf4, int8)")


def test_keys_of_the_other_task_are_refused():
    assert problems_of(MINIMAL + "[eval]\nwindow = 64\n") == [
        "eval.window: a perplexity window; only causal_lm suites have one (clip measures recall@k)"
    ]
    lm = MINIMAL.replace('task = "clip"', 'task = "causal_lm"').replace('name = "shapes"', 'name = "pydoc"')
    assert problems_of(lm + "[eval]\nrecall_k = [1]\n") == ["eval.recall_k: only clip suites measure recall@k (causal_lm measures perplexity)"]


def test_a_contrastive_batch_of_one_is_refused():
    (problem,) = problems_of(MINIMAL.replace("steps = 4", "steps = 4\nbatch_size = 1"))
    assert problem.startswith("train.batch_size: a contrastive batch of 1 has no negatives")


# -- every size has an upper bound, and says why ---------------------------------------------------


@pytest.mark.parametrize(
    ("key", "line", "limit"),
    [
        ("train.steps", "steps = 99999999999999999999999", "at most 1,000,000: a million optimizer steps"),
        ("train.batch_size", "batch_size = 1000000000", "at most 65,536: torch builds each batch's index list"),
        ("train.grad_accum", "grad_accum = 1180591620717411303424", "at most 4,096"),
        ("train.max_length", "max_length = 1180591620717411303424", "at most 1,048,576: no model qbench can load"),
        ("train.lr", "lr = 1e300", "at most 1: AdamW moves each weight by about lr per step"),
        ("train.weight_decay", "weight_decay = 1e300", "at most 1: decoupled weight decay"),
    ],
)
def test_each_training_size_has_a_bound_with_its_reason(key: str, line: str, limit: str):
    section = MINIMAL.replace("steps = 4\nlr = 1e-3", "steps = 4\nlr = 1e-3\n" + line) if not line.startswith(("steps", "lr")) \
        else MINIMAL.replace(line.split(" = ")[0] + " = " + ("4" if line.startswith("steps") else "1e-3"), line)
    (problem,) = problems_of(section)
    assert problem.startswith(f"{key}: {limit}"), problem
    assert len(problem.splitlines()) == 1


@pytest.mark.parametrize(
    ("table", "key", "limit"),
    [
        ("[eval]\nbatch_size = 1180591620717411303424\n", "eval.batch_size", "at most 65,536"),
        ("[eval]\nrecall_k = [1, 1180591620717411303424]\n", "eval.recall_k", "at most 1,000,000"),
        ("[matrix]\nseeds = [" + ", ".join(map(str, range(1001))) + "]\n", "matrix.seeds", "no more than 1,000 seeds"),
    ],
)
def test_evaluation_and_matrix_sizes_have_bounds(table: str, key: str, limit: str):
    (problem,) = problems_of(MINIMAL + table)
    assert problem.startswith(f"{key}: {limit}"), problem


def test_warmup_must_leave_steps_and_the_lora_scale_is_bounded():
    (problem,) = problems_of(MINIMAL.replace("steps = 4", "steps = 4\nwarmup_steps = 4\nuntimed_steps = 1"))
    assert problem.startswith("train: warmup_steps (4) must be below steps (4)")
    (problem,) = problems_of(MINIMAL.replace('target_modules = ["q_proj"]', 'target_modules = ["q_proj"]\nr = 1\nalpha = 1e300'))
    assert problem.startswith("lora: lora.alpha / lora.r = 1e+300 scales the adapter's output; at most 1,024")


def test_absurd_steps_stop_at_once_rather_than_training_forever(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, MINIMAL.replace("steps = 4", "steps = 99999999999999999999999"))
    assert run(tmp_path, suite) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "train.steps: at most 1,000,000" in line


# -- sizes against the data and the machine ---------------------------------------------------------


def test_a_batch_larger_than_the_training_split_stops_before_any_cell(tmp_path: Path, tiny_clip_dir: Path, tsv_data_dir: Path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("train-000.png\ta red square on white\n", encoding="utf-8")
    (data / "eval.tsv").write_text((tsv_data_dir / "eval.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    (data / "images").symlink_to(tsv_data_dir / "images")
    suite = write_suite(tmp_path, clip.suite(tiny_clip_dir, data).replace("batch_size = 8", "batch_size = 4"))
    assert run(tmp_path, suite) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("train.batch_size: 4 is more than the 1 training caption(s) of data.train "
                         f"({data / 'train.tsv'}): each step takes a full batch, so no step could run; lower train.batch_size or add data")


def test_a_batch_larger_than_the_builtin_split_is_refused(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, MINIMAL.replace("steps = 4", "steps = 4\nbatch_size = 1000"))
    assert run(tmp_path, suite) == 2
    assert "train.batch_size: 1,000 is more than the 720 training caption(s) of builtin dataset 'shapes'" in capsys.readouterr().err


def test_a_batch_that_cannot_fit_the_machine_is_refused_from_an_estimate(tmp_path: Path, capsys, monkeypatch):
    from qbench.runner import estimate

    monkeypatch.setattr(estimate, "device_memory", lambda device, gpus_per_cell=1: (2 * estimate.GIB, "RAM of this machine"))
    lm = suites.causal_lm(
        precisions=("bf16",), lora='target_modules = ["q_proj"]', steps=2,
        train="batch_size = 4096\nlr = 1e-3\nmax_length = 128\nuntimed_steps = 1", evaluation=None,
    )
    suite = write_suite(tmp_path, lm)
    assert run(tmp_path, suite) == 2
    (line,) = capsys.readouterr().err.splitlines()
    # 4096 x 128 x 1024 logits: 1 GiB in bf16 and 2 GiB as float32 log-probabilities
    assert "train.batch_size x train.max_length: one train batch needs at least 3.0 GiB (weights at 4 bits 0.0 GiB, " \
           "logits 4096x128x1024 1.0 GiB, their float32 log-probabilities 2.0 GiB), more than the 2.0 GiB RAM of this machine" in line
    assert run(tmp_path, write_suite(tmp_path, lm.replace("batch_size = 4096", "batch_size = 256"), "fits.toml"), "--check") == 0


def test_the_estimate_counts_clip_pixel_values():
    from types import SimpleNamespace

    from qbench.runner import estimate

    suite = parse(MINIMAL.replace("steps = 4", "steps = 4\nbatch_size = 65536"))
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=224, patch_size=32, hidden_size=768))
    train = estimate.needs(suite, config, parameters=150_000_000, max_length=77)[0]
    assert train.parts["pixel values 65536x3x224x224 float32"] == 65536 * 3 * 224 * 224 * 4
    assert train.total > 39 * estimate.GIB


# -- text corpora: every problem a cell would meet, found first --------------------------------------

def lm_text_suite(train: str, evaluation: str) -> str:
    return suites.causal_lm(
        data={"train": train, "eval": evaluation}, lora='target_modules = ["q_proj"]', evaluation="window = 64",
    )
GOOD = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.txt", b"", "data.train: {path}: contains no text"),
        ("train.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)), "data.train: {path}:1: a NUL byte (byte 7): a binary file"),
        ("train.txt", b"ok\n\x80\x81", "data.train: {path}:2: not UTF-8 text (byte 3)"),
        ("train.jsonl", b'{"content": "no text field"}\n', 'data.train: {path}:1: missing field "text" (the object has fields \'content\')'),
        ("train.jsonl", b'{"text": ["a", "list"]}\n', 'data.train: {path}:1: field "text" must be a string, not a JSON array'),
        ("train.csv", b"text\nhello\n", "data.train: {path}: unsupported text file type '.csv'; expected .txt or .jsonl"),
        ("train.txt", b"too short", "data.train: lm-data/train.txt has 5 token(s) for this model, fewer than the 33 of one training window"),
    ],
)
def test_an_unusable_training_corpus_stops_before_any_cell(tmp_path: Path, capsys, name: str, content: bytes, message: str):
    folder = tmp_path / "lm-data"
    folder.mkdir()
    (folder / name).write_bytes(content)
    (folder / "eval.txt").write_text(GOOD, encoding="utf-8")
    suite = write_suite(tmp_path, lm_text_suite(f"lm-data/{name}", "lm-data/eval.txt"))
    assert run(tmp_path, suite) == 2
    lines = capsys.readouterr().err.splitlines()
    expected = message.format(path=folder / name)
    assert len(lines) == 1 and expected in lines[0], lines


def test_an_eval_text_of_one_token_is_refused(tmp_path: Path, capsys):
    (tmp_path / "train.txt").write_text(GOOD, encoding="utf-8")
    (tmp_path / "eval.txt").write_text("The", encoding="utf-8")
    suite = write_suite(tmp_path, lm_text_suite("train.txt", "eval.txt"))
    assert run(tmp_path, suite) == 2
    assert "data.eval: eval.txt has 1 token(s) for this model, fewer than the 2 of a perplexity" in capsys.readouterr().err


def test_a_good_corpus_passes_and_a_large_one_is_only_read_at_its_start(tmp_path: Path):
    from qbench.cell import models
    from qbench.runner.preflight import count_tokens_up_to

    (tmp_path / "train.txt").write_text(GOOD, encoding="utf-8")
    (tmp_path / "eval.txt").write_text(GOOD, encoding="utf-8")
    assert run(tmp_path, write_suite(tmp_path, lm_text_suite("train.txt", "eval.txt")), "--check") == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.resolve("builtin:tiny-llama"))
    calls: list[int] = []
    counting = lambda text, **kw: (calls.append(len(text)), tokenizer(text, **kw))[1]  # noqa: E731
    assert count_tokens_up_to(counting, GOOD * 10_000, 33) >= 33 and calls == [(33 + 8) * 16]
    assert count_tokens_up_to(tokenizer, "The quick", 33) == len(tokenizer("The quick", add_special_tokens=False)["input_ids"])


# -- echoed user text stays one line -----------------------------------------------------------------


def test_an_unknown_key_with_a_newline_or_escape_is_shown_escaped_on_one_line(tmp_path: Path, capsys):
    text = MINIMAL.replace("steps = 4", '"stepz\\n[model]" = 1\n"\\u001b[31mred" = 2\nsteps = 4')
    assert sorted(problems_of(text)) == sorted([
        "train.'stepz\\n[model]': unknown key",
        "train.'\\x1b[31mred': unknown key",
    ])
    suite = write_suite(tmp_path, text)
    assert run(tmp_path, suite) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and len(err.splitlines()) == 2
    assert f"error: {suite}: train.'stepz\\n[model]': unknown key" in err.splitlines()


def test_every_echoed_problem_is_one_printable_line(capsys):
    from qbench.cli import render

    render.error("a\nb\rc\x1b[2Jd\u2028e\x85f\tg")
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "error: a\\nb\\rc\\x1b[2Jd\\u2028e\\x85f\\tg"
    json.dumps(line)


def test_a_suite_file_with_a_byte_order_mark_and_crlf_endings_reads_as_without(tmp_path: Path):
    from qbench.contract.suite import load

    plain = write_suite(tmp_path, MINIMAL)
    windows = tmp_path / "windows.toml"
    windows.write_bytes(b"\xef\xbb\xbf" + MINIMAL.replace("\n", "\r\n").encode("utf-8"))
    assert load(windows).suite == load(plain).suite


def test_check_and_an_empty_resume_are_not_silently_ignored(tmp_path: Path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path), "--check"]) == 2
    assert "drop --check" in capsys.readouterr().err
    suite = write_suite(tmp_path, MINIMAL)
    assert cli.main(["run", str(suite), "--resume", "", "--out", str(tmp_path / "out")]) == 2  # not a fresh run of SUITE
    assert not (tmp_path / "out").exists()


# -- the grid's axes: every value is checked as the suite's own setting is --------------------------


def test_every_grid_value_of_a_length_or_batch_is_checked(tmp_path: Path, capsys):
    (problem,) = problems_of(MINIMAL + "[matrix]\nbatch_size = [4, 1000000000]\n")
    assert problem.startswith("matrix.batch_size: at most 65,536")
    (problem,) = problems_of(MINIMAL + "[matrix]\nbatch_size = [1, 4]\n")
    assert problem.startswith("matrix.batch_size: a contrastive batch of 1 has no negatives")
    (problem,) = problems_of(MINIMAL.replace('target_modules = ["q_proj"]', 'target_modules = ["q_proj"]\nalpha = 2048') +
                             "[matrix]\nlora_r = [1, 8]\n")
    assert problem.startswith("matrix.lora_r: lora.alpha / 1 = 2048 scales the adapter's output; at most 1,024")
    suite = write_suite(tmp_path, MINIMAL + "[matrix]\nprecisions = [\"bf16\"]\nmax_length = [16, 64]\nbatch_size = [8, 1000]\n")
    assert run(tmp_path, suite) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "matrix.batch_size: 1,000 is more than the 720 training caption(s) of builtin dataset 'shapes'" in lines[0]
    assert "matrix.max_length: 64 tokens, but model 'builtin:tiny-clip' takes at most 16" in lines[1]
