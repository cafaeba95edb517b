"""Fuzzing the inputs of `qbench run`: mutated suites, TSV annotation files, text corpora and command-line
lists. Whatever the input: exit 0, 1 or 2 only, never a traceback, one `error:` line per problem, every
line number a problem names is a line the file has, and nothing written outside --out.

Most examples go through `qbench run --check` (every check a run makes before its first cell, and then
nothing): the checks are where bad input must stop. A few go through a whole run with the standard-library
stand-in cell (tests/fake_cell.py), to hold the parent to writing nothing outside --out.
(Run folders and records under fault are fuzzed by helper "safety"'s tests.)
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from qbench import cli
from qbench.cell import models
from qbench.cell.data.tsv import load_tsv

from .conftest import examples
from .helpers import executors

# 25 examples per property keep this file well under a minute in CI; QBENCH_FUZZ_EXAMPLES=1000 searches harder
FUZZ = settings(max_examples=examples(int(os.environ.get("QBENCH_FUZZ_EXAMPLES", "25"))), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# characters that split lines or fields in one tool and not another, and other trouble
NASTY = ["\t", "\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029", "\ufeff", "\x1b[31m",
         '"', "'", "\\", "../", "/", " ", "é", "\udcff"]


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime) of every file and folder under `folder` (but not under `skip`)."""
    seen = {}
    for root, dirs, files in os.walk(folder):
        if skip is not None and Path(root).is_relative_to(skip):
            continue
        for name in dirs + files:
            path = Path(root) / name
            if skip is None or not path.is_relative_to(skip):
                stat = path.lstat()
                seen[str(path)] = (stat.st_size if not path.is_dir() else 0, stat.st_mtime_ns if not path.is_dir() else 0)
    return seen


def qbench(*argv: str) -> tuple[int, str, str]:
    """`qbench ARGV` in this process: (exit code, stdout, stderr). An exception other than SystemExit
    escapes and fails the test (a traceback is what the user would have seen)."""
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):  # rich's consoles write to whatever sys.stdout/stderr are now
        try:
            code = cli.main(list(argv))
        except SystemExit as stop:  # argparse's own usage errors
            code = stop.code if isinstance(stop.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, out: str, err: str, allowed=(0, 2)) -> None:
    assert code in allowed, (code, err)
    assert "Traceback" not in out + err
    if code == 2:
        lines = err.splitlines()
        assert lines, "exit 2 without saying why"
        assert all(line.startswith("error: ") and line.isprintable() for line in lines), err


def first_batch(path: Path) -> None:
    """What a cell does with the data before its first step: the task's data phase, then one training batch
    (tokenized to max_length, every image of it opened and processed). The checks passed, so this must work."""
    from qbench.cell.tasks import get_task
    from qbench.contract.suite import load

    loaded = load(path)
    if loaded.suite.data.num_workers:  # worker processes: slow to start, and what they read is read here the same
        return
    task = get_task(loaded, models.resolve(loaded.suite.model.id, path.parent), "cpu")
    task.prepare_data()
    batch = next(task.train_batches(0))
    assert batch.samples == loaded.suite.train.batch_size
    if loaded.suite.task == "clip":  # the eval split's images open as the training ones do
        from qbench.cell.data.pairs import open_image

        for image in task.eval_split.images:
            open_image(image)


def named_lines_exist(err: str, files: dict[str, bytes]) -> None:
    """Every `FILE:N:` an error names is a line of FILE as `wc -l` counts (a last line without LF counts)."""
    for name, content in files.items():
        lines = content.count(b"\n") + (0 if content.endswith(b"\n") or not content else 1)
        for number in re.findall(re.escape(name) + r":(\d+):", err):
            assert 1 <= int(number) <= max(lines, 1), (name, number, lines, err)


# -- the material: a tiny CLIP with TSV data, the tiny Llama with text files ---------------------------


@pytest.fixture(scope="module")
def material(tmp_path_factory, tiny_clip_dir: Path, tsv_data_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-material")
    shutil.copytree(tsv_data_dir / "images", root / "images")
    return {"root": root, "images": root / "images", "clip": tiny_clip_dir, "train": tsv_data_dir / "train.tsv",
            "eval": tsv_data_dir / "eval.tsv", "llama": Path(models.resolve("builtin:tiny-llama"))}


def clip_suite(material: dict[str, Path], train: str = "train.tsv", eval: str = "eval.tsv") -> dict:
    return {
        "name": "fuzz", "task": "clip",
        "model": {"id": str(material["clip"])},
        "data": {"kind": "tsv", "train": train, "eval": eval, "image_root": str(material["images"])},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "max_length": 16, "untimed_steps": 1},
        "eval": {"batch_size": 16, "recall_k": [1, 5]},
        "matrix": {"precisions": ["bf16", "nf4"], "seeds": [0]},
    }


def lm_suite(train: str = "train.txt", eval: str = "eval.txt") -> dict:
    return {
        "name": "fuzzlm", "task": "causal_lm",
        "model": {"id": "builtin:tiny-llama"},
        "data": {"kind": "text", "train": train, "eval": eval},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "max_length": 32, "untimed_steps": 1},
        "eval": {"batch_size": 4, "window": 64},
        "matrix": {"precisions": ["bf16", "nf4"], "seeds": [0]},
    }


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml(document: dict) -> str:
    top = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)]
    tables = [f"[{json.dumps(k)}]\n" + "\n".join(f"{json.dumps(kk)} = {toml_value(vv)}" for kk, vv in v.items())
              for k, v in document.items() if isinstance(v, dict)]
    text = "\n".join(top) + "\n" + "\n".join(tables) + "\n"
    tomllib.loads(text)  # the fuzzer writes valid TOML: the TOML parser is not what is tested here
    return text


BOUNDARY_INTS = [0, 1, 2, 3, 4, 15, 16, 17, 32, 33, 64, 127, 128, 129, 720, 721, 4096, 4097, 65536, 65537, 2**31, 2**63, 10**23, -1]
values = st.one_of(
    st.sampled_from(BOUNDARY_INTS),
    st.sampled_from([0.0, 1e-3, 0.5, 1.0, 1.5, 1e300, -1e-3]),
    st.booleans(),
    st.sampled_from(["", "bf16", "nf4-dq", "fp32", "q_proj", "cosine", "none", "builtin:tiny-clip", "builtin:tiny-llama",
                     "../../etc", "eval.tsv", "train.tsv", "x\ny", "\x1b[2J", "auto"]),
    st.lists(st.sampled_from(BOUNDARY_INTS + ["bf16", "nf4", "int8", "q_proj"]), max_size=3),
)
keys = st.one_of(st.sampled_from(["steps", "batch_size", "max_length", "window", "recall_k", "seeds", "precisions", "baseline",
                                  "grad_accum", "warmup_steps", "lr", "alpha", "r", "id", "kind", "name", "train", "eval"]),
                 st.text(st.sampled_from("abz_" + "".join(NASTY[:12])), min_size=1, max_size=6))


@st.composite
def mutated(draw, base: dict) -> dict:
    document = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        table = draw(st.sampled_from([document] + [v for v in document.values() if isinstance(v, dict)]))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        key = draw(st.sampled_from(sorted(table))) if table and action != "add" else draw(keys)
        if action == "delete":
            table.pop(key, None)
        elif not isinstance(table.get(key), dict):
            table[key] = draw(values)
    return document


def write_case(folder: Path, suite: dict, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (folder / name).write_bytes(content)
    path = folder / "suite.toml"
    path.write_text(toml(suite), encoding="utf-8")
    return path


def check_case(suite: dict, files: dict[str, bytes], *options: str) -> tuple[int, str, str]:
    """Write the case into a fresh folder, run `qbench run --check` on it, and hold it to the rules."""
    with tempfile.TemporaryDirectory(prefix="qbench-fuzz-") as scratch:
        folder = Path(scratch)
        path = write_case(folder, suite, files)
        before, cwd_before = snapshot(folder), sorted(os.listdir())
        code, out, err = qbench("run", str(path), "--check", "--device", "cpu", "--out", str(folder / "out"), *options)
        assert_clean(code, out, err)
        event(f"exit {code}" + (f": {err.split(': ', 3)[2]}" if code == 2 and err.count(": ") >= 3 else ""))
        named_lines_exist(err, {str(folder / name): content for name, content in files.items()})
        after, cwd_after = snapshot(folder), sorted(os.listdir())
        assert after == before, set(after.items()) ^ set(before.items())  # --check writes nothing
        assert cwd_after == cwd_before, set(cwd_after) ^ set(cwd_before)
        if code == 0:
            first_batch(path)
    return code, out, err


# -- suites --------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_mutated_clip_suites_pass_or_stop_with_one_line_per_problem(material, data):
    base = clip_suite(material)
    files = {"train.tsv": material["train"].read_bytes(), "eval.tsv": material["eval"].read_bytes()}
    check_case(data.draw(mutated(base)), files)


@FUZZ
@given(data=st.data())
def test_mutated_llm_suites_pass_or_stop_with_one_line_per_problem(data):
    text = ("The quick brown fox jumps over the lazy dog. " * 30).encode()
    check_case(data.draw(mutated(lm_suite())), {"train.txt": text, "eval.txt": text})


# -- TSV annotation files ------------------------------------------------------------------------------


IN_CAPTION = [c for c in NASTY if c not in ("\t", "\r", "\n", "\r\n", "\x00", "\udcff")] + ["\t", "\r\n"]


@st.composite
def mutated_bytes(draw, original: bytes) -> bytes:
    """The file with a few edits: most inside captions (what a real file holds), some anywhere."""
    content = original
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(content)))
        action = draw(st.sampled_from(["caption", "caption", "caption", "insert", "delete", "line", "bytes"]))
        if action == "caption":  # an odd character inside a caption, or a tab / CRLF at the end of a line
            lines = content.split(b"\n")
            index = draw(st.integers(0, max(len(lines) - 2, 0)))
            line, piece = lines[index], draw(st.sampled_from(IN_CAPTION)).encode("utf-8")
            if b"\t" in line and piece not in (b"\t", b"\r\n"):
                cut = draw(st.integers(line.index(b"\t") + 2, max(len(line) - 1, line.index(b"\t") + 2)))
                lines[index] = line[:cut] + piece + line[cut:]
            elif piece in (b"\t", b"\r\n"):
                lines[index] = line + piece.rstrip(b"\n")
            content = b"\n".join(lines)
        elif action == "insert":
            piece = draw(st.sampled_from(NASTY)).encode("utf-8", "surrogateescape")
            content = content[:at] + piece + content[at:]
        elif action == "delete":
            content = content[:at] + content[at + draw(st.integers(1, 12)):]
        elif action == "line":
            line = draw(st.text(st.sampled_from("ab .png/\t" + "".join(NASTY[:8])), max_size=20))
            content = content[:at] + line.encode("utf-8") + b"\n" + content[at:]
        else:
            content = content[:at] + draw(st.binary(min_size=1, max_size=4)) + content[at:]
    return content


@FUZZ
@given(data=st.data())
def test_mutated_annotation_files_pass_or_name_real_lines(material, data):
    train = data.draw(mutated_bytes(material["train"].read_bytes()))
    evaluation = data.draw(st.one_of(st.just(material["eval"].read_bytes()), mutated_bytes(material["eval"].read_bytes())))
    code, _, err = check_case(clip_suite(material), {"train.tsv": train, "eval.tsv": evaluation})
    if code == 0:  # what qbench accepted, csv reads the same way: the same captions, one per line
        with tempfile.TemporaryDirectory(prefix="qbench-fuzz-") as scratch:
            path = Path(scratch) / "train.tsv"
            path.write_bytes(train)
            with path.open(encoding="utf-8-sig", newline="") as handle:
                rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if any(f.strip() for f in row)]
            captions = load_tsv(path, material["images"]).captions
        assert captions == [row[1].strip() for row in rows]


# -- text corpora --------------------------------------------------------------------------------------

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)
jsonl_lines = st.one_of(
    st.builds(lambda text: json.dumps({"text": text}, ensure_ascii=False), st.text(max_size=200)),
    st.builds(lambda value: json.dumps(value, ensure_ascii=False), json_values),
    st.text(st.sampled_from('{}[]":, text\\' + "".join(NASTY[:10])), max_size=30),
)


@st.composite
def corpora(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".txt", ".txt", ".jsonl", ".jsonl", ".csv", ".TXT"]))
    if suffix.lower() == ".jsonl" and draw(st.booleans()):
        lines = draw(st.lists(jsonl_lines, max_size=8))
        return suffix, draw(st.sampled_from(["\n", "\r\n"])).join(lines).encode("utf-8", "surrogateescape")
    kind = draw(st.sampled_from(["text", "bytes", "nasty", "long", "long"]))
    if kind == "long":  # long enough to train on, with odd characters in it
        odd = [c for c in NASTY if c not in ("\x00", "\udcff")]  # what a text file may hold (no NUL, valid UTF-8)
        words = draw(st.lists(st.sampled_from(["the ", "quick ", "dog ", "jumps. "] * 4 + odd), min_size=80, max_size=200))
        text = "".join(words)
        if suffix.lower() == ".jsonl":
            return suffix, (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        return suffix, text.encode("utf-8", "surrogateescape")
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=200))
    if kind == "nasty":
        return suffix, "".join(draw(st.lists(st.sampled_from(NASTY + ["the ", "dog "]), max_size=40))).encode("utf-8", "surrogateescape")
    return suffix, draw(st.text(max_size=400)).encode("utf-8", "surrogateescape")


GOOD_TEXT = (".txt", ("The quick brown fox jumps over the lazy dog. " * 30).encode())


@FUZZ
@given(train=corpora(), evaluation=st.one_of(st.just(GOOD_TEXT), corpora()))
def test_mutated_text_corpora_pass_or_stop_before_any_cell(train, evaluation):
    (train_suffix, train_bytes), (eval_suffix, eval_bytes) = train, evaluation
    names = {"train": "train" + train_suffix, "eval": "eval" + eval_suffix}
    check_case(lm_suite(names["train"], names["eval"]), {names["train"]: train_bytes, names["eval"]: eval_bytes})


# -- command-line lists --------------------------------------------------------------------------------


@FUZZ
@given(option=st.sampled_from(["--only", "--seeds", "--shard", "--gpus"]),
       value=st.text(st.sampled_from(list("0123456789,/-bfnq4dx ") + [c for c in NASTY if len(c) == 1]), max_size=10))
@example(option="--seeds", value="--")  # found by a random run: argparse handed `--seeds=--` over as an empty list
@example(option="--only", value="--")
def test_random_command_line_lists_pass_or_stop_with_one_line(material, option: str, value: str):
    assume("\x00" not in value)  # the operating system cannot pass a NUL in an argument
    files = {"train.tsv": material["train"].read_bytes(), "eval.tsv": material["eval"].read_bytes()}
    check_case(clip_suite(material), files, f"{option}={value}")


# -- whole runs (stand-in cells): nothing written outside --out ------------------------------------------


@settings(max_examples=examples(6), deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.sampled_from("ab._-9"), min_size=1, max_size=8), only=st.sampled_from([None, "bf16", "nf4", "bf16,nf4"]),
       out=st.sampled_from(["out", "out/deeper", "o u t"]))
def test_a_whole_run_writes_only_under_out(material, monkeypatch, name: str, only, out: str):
    assume(not name.startswith("."))  # names that become paths outside --out: tests/test_nothing_lost.py
    executors.use(monkeypatch, executors.FAKE)
    with tempfile.TemporaryDirectory(prefix="qbench-fuzz-run-") as scratch:
        folder = Path(scratch)
        monkeypatch.setenv("FAKE_CELL_DIR", str(folder / "out-fake"))
        monkeypatch.setenv("FAKE_CELL_HOLD_S", "0")
        suite = clip_suite(material)
        suite["name"] = name
        path = write_case(folder, suite, {"train.tsv": material["train"].read_bytes(), "eval.tsv": material["eval"].read_bytes()})
        before, cwd_before = snapshot(folder), sorted(os.listdir())
        argv = ["run", str(path), "--device", "cpu", "--out", str(folder / out)] + (["--only", only] if only else [])
        code, out_text, err = qbench(*argv)
        assert_clean(code, out_text, err, allowed=(0, 1))
        after = snapshot(folder, skip=folder / out.split("/")[0])
        assert {k: v for k, v in after.items() if not k.startswith(str(folder / "out-fake"))} == before
        assert sorted(os.listdir()) == cwd_before
        assert list((folder / out / name).glob("*/cells/*.json"))
