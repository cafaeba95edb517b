"""The builtin pydoc corpus split and the plain-text / JSONL loader."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from qbench.cell.data import text
from qbench.cell.data.text import (
    TextCorpus,
    builtin_corpus,
    builtin_topics,
    corpus_sha256,
    load_text_file,
    pretrain_text,
)
from qbench.contract.tasks import builtin_names


def test_pydoc_parts_are_disjoint_and_cover_every_topic():
    from pydoc_data.topics import topics

    parts = builtin_topics("pydoc")
    assert set(parts) == {"pretrain", "train", "eval"}
    names = [name for part in parts.values() for name in part]
    assert len(names) == len(set(names)), "a topic is in two parts"
    assert set(names) == set(topics)


def test_pydoc_texts_share_no_topic_body():
    from pydoc_data.topics import topics

    corpus = builtin_corpus("pydoc")
    pretrain = pretrain_text("pydoc")
    parts = builtin_topics("pydoc")
    for name in parts["eval"]:
        assert topics[name] in corpus.eval
        if len(topics[name]) > 1000:  # short bodies could appear inside longer ones by chance
            assert topics[name] not in corpus.train
            assert topics[name] not in pretrain
    for name in parts["train"]:
        assert topics[name] in corpus.train


def test_pretrain_is_the_largest_part_and_eval_is_not_tiny():
    corpus = builtin_corpus("pydoc")
    pretrain = pretrain_text("pydoc")
    assert len(pretrain) > len(corpus.train) + len(corpus.eval)
    assert len(corpus.train) > 50_000
    assert len(corpus.eval) > 30_000


def test_split_is_deterministic_within_a_process():
    first = builtin_topics("pydoc")
    text._pydoc_parts.cache_clear()
    assert builtin_topics("pydoc") == first


def test_hash_is_the_hash_of_train_and_eval():
    corpus = builtin_corpus("pydoc")
    assert corpus.sha256 == corpus_sha256(corpus.train, corpus.eval)
    assert len(corpus.sha256) == 64
    # Moving text across the train/eval boundary changes the hash.
    assert corpus_sha256(corpus.train + "x", corpus.eval) != corpus_sha256(corpus.train, "x" + corpus.eval)


def test_hash_is_stable_across_processes_with_different_hash_seeds():
    code = "from qbench.cell.data.text import builtin_corpus; print(builtin_corpus().sha256)"
    hashes = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=pathlib.Path(__file__).parents[1],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert hashes == {builtin_corpus().sha256}


def test_source_records_the_python_version():
    version = ".".join(map(str, sys.version_info[:3]))
    assert f"Python {version}" in builtin_corpus().source


def test_from_parts_computes_the_hash():
    corpus = TextCorpus.from_parts("abc", "def", "hand-made")
    assert corpus.sha256 == corpus_sha256("abc", "def")
    assert corpus.sha256 != corpus_sha256("abcdef", "")


def test_unknown_builtin_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown builtin corpus 'nope'; known: pydoc"):
        builtin_corpus("nope")
    with pytest.raises(ValueError, match="unknown builtin corpus"):
        pretrain_text("nope")
    assert builtin_names("causal_lm") == ["pydoc"]


def test_txt_file_is_read_as_is(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n", encoding="utf-8")
    assert load_text_file(path) == "first line\nsecond line\n"


def test_jsonl_texts_are_joined_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text_file(path) == "one\n\ntwo"


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: invalid JSON"):
        load_text_file(path)


def test_jsonl_missing_text_field_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(ValueError, match=r'corpus\.jsonl:3: missing field "text" \(the object has fields \'body\'\)'):
        load_text_file(path)


def test_jsonl_text_that_is_not_a_string_names_the_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r'corpus\.jsonl:1: field "text" must be a string, not a JSON number'):
        load_text_file(path)


def test_jsonl_line_that_is_not_an_object_names_the_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('["text"]\n')
    with pytest.raises(ValueError, match=r'corpus\.jsonl:1: a line must be a JSON object with a "text" field, not a JSON array'):
        load_text_file(path)


def test_empty_file_and_unknown_suffix_are_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=r"empty\.txt: contains no text"):
        load_text_file(empty)
    csv = tmp_path / "corpus.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"corpus\.csv: unsupported text file type '\.csv'"):
        load_text_file(csv)
