"""Annotation and text files are read the way `wc -l`, `awk` and `csv` read them, and every problem
names the file's physical line."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbench.cell.data.pairs import DataError
from qbench.cell.data.text import load_text_file
from qbench.cell.data.tsv import load_tsv

from .conftest import examples

# every character str.splitlines() breaks at that no standard tool does
PYTHON_ONLY_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index * 80, 0, 0)).save(root / f"{index}.png")
    return root


def problems(annotation: Path, images: Path) -> list[str]:
    with pytest.raises(DataError) as caught:
        load_tsv(annotation, images)
    return str(caught.value).split("\n")


def text_problems(path: Path) -> list[str]:
    with pytest.raises(ValueError) as caught:
        load_text_file(path)
    return str(caught.value).split("\n")


def wc_lines(path: Path) -> int:
    return int(subprocess.run(["wc", "-l", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def csv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


@pytest.mark.parametrize("odd", PYTHON_ONLY_BREAKS, ids=[f"U+{ord(c):04X}" for c in PYTHON_ONLY_BREAKS])
def test_a_caption_holding_a_character_splitlines_breaks_at_stays_one_caption(tmp_path: Path, images: Path, odd: str):
    annotation = tmp_path / "a.tsv"
    annotation.write_text(f"0.png\ta red{odd}square\n1.png\tsecond\nmissing.png\tthird\n", encoding="utf-8")
    assert wc_lines(annotation) == 3
    # the third line is bad: its number must be 3, as wc -l and awk count, whatever the first line holds
    assert problems(annotation, images) == [f"{annotation}:3: image 'missing.png' not found under {images}"]
    annotation.write_text(f"0.png\ta red{odd}square\n1.png\tsecond\n", encoding="utf-8")
    split = load_tsv(annotation, images)
    assert split.captions == [f"a red{odd}square", "second"] == [row[1] for row in csv_rows(annotation)]


def test_crlf_a_byte_order_mark_and_trailing_blank_lines_read_as_the_same_lines(tmp_path: Path, images: Path):
    plain = tmp_path / "plain.tsv"
    plain.write_text("0.png\tred\n1.png\tgreen\n", encoding="utf-8")
    windows = tmp_path / "windows.tsv"
    windows.write_bytes(b"\xef\xbb\xbf0.png\tred\r\n1.png\tgreen\r\n\r\n\r\n")
    no_final_newline = tmp_path / "last.tsv"
    no_final_newline.write_text("0.png\tred\n1.png\tgreen", encoding="utf-8")
    assert load_tsv(windows, images) == load_tsv(plain, images) == load_tsv(no_final_newline, images)
    # the problems of a CRLF file name the lines wc -l counts
    windows.write_bytes(b"0.png\tred\r\n\r\nmissing.png\tx\r\n")
    assert problems(windows, images) == [f"{windows}:3: image 'missing.png' not found under {images}"]


def test_a_carriage_return_inside_a_line_is_refused_naming_the_line(tmp_path: Path, images: Path):
    """csv ends a line at a lone CR, wc -l and awk do not: the tools disagree, so qbench does not guess."""
    annotation = tmp_path / "cr.tsv"
    annotation.write_bytes(b"0.png\tred\n1.png\tgreen\rsquare\n")
    (problem,) = problems(annotation, images)
    assert problem.startswith(f"{annotation}:2: a carriage return (CR) inside a line")


def test_a_binary_annotation_file_is_refused_naming_the_line(tmp_path: Path, images: Path):
    annotation = tmp_path / "binary.tsv"
    annotation.write_bytes(b"0.png\tred\n1.png\tgr\x00een\n")
    assert problems(annotation, images) == [f"{annotation}:2: a NUL byte (byte 18): a binary file, not UTF-8 text"]


def test_a_caption_with_a_tab_is_an_error_naming_the_line_not_two_captions(tmp_path: Path, images: Path):
    """The rule (docs/suites.md): a line is image<TAB>caption; a further tab is refused, because it is either a
    caption holding a tab or a second caption, and qbench does not guess which."""
    annotation = tmp_path / "tab.tsv"
    annotation.write_text("0.png\tfine\n1.png\ta red square\ton a white background\n", encoding="utf-8")
    (problem,) = problems(annotation, images)
    assert problem.startswith(f"{annotation}:2: 3 tab-separated fields; a line is image_path<TAB>caption")
    # a trailing tab (a spreadsheet's export) leaves one caption and is fine
    annotation.write_text("0.png\tfine\t\n1.png\tsecond\t \t\n", encoding="utf-8")
    assert load_tsv(annotation, images).captions == ["fine", "second"]


def test_several_captions_of_one_image_are_repeated_lines(tmp_path: Path, images: Path):
    annotation = tmp_path / "many.tsv"
    annotation.write_text("0.png\tfirst\n1.png\tother\n0.png\tsecond\n", encoding="utf-8")
    split = load_tsv(annotation, images)
    assert split.captions == ["first", "other", "second"] and split.caption_image == [0, 1, 0]


def test_more_than_twenty_problems_are_cut_with_a_count(tmp_path: Path, images: Path):
    annotation = tmp_path / "bad.tsv"
    annotation.write_text("no tab here\n" * 25, encoding="utf-8")
    found = problems(annotation, images)
    assert len(found) == 21 and found[-1] == "... and 5 more problems" and found[19] == f"{annotation}:20: no tab between image path and caption"


captions = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r\x00"), min_size=1, max_size=20
).filter(lambda text: text.strip())


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(st.sampled_from(["0.png", "1.png", "2.png"]), captions), min_size=1, max_size=8),
       crlf=st.booleans(), bom=st.booleans(), blank_tail=st.integers(0, 2))
def test_any_well_formed_file_has_the_captions_csv_reads_and_the_lines_wc_counts(
    tmp_path: Path, images: Path, lines, crlf: bool, bom: bool, blank_tail: int
):
    end = "\r\n" if crlf else "\n"
    text = "".join(f"{image}\t{caption}{end}" for image, caption in lines) + end * blank_tail
    annotation = tmp_path / "fuzz.tsv"
    annotation.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    assert wc_lines(annotation) == len(lines) + blank_tail
    split = load_tsv(annotation, images)
    assert split.captions == [caption.strip() for _, caption in lines] == [row[1].strip() for row in csv_rows(annotation)]


def test_parse_line_takes_the_first_tab_as_the_separator():
    from qbench.cell.data.tsv import parse_line

    assert parse_line(" a.png \t a caption ") == ("a.png", "a caption")
    assert parse_line("a.png") == "no tab between image path and caption"


# -- text corpora ---------------------------------------------------------------------------------


def test_a_txt_corpus_drops_its_byte_order_mark_and_reads_crlf_as_lf_and_nothing_else(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\x0cthree\xc2\x85four\r\n")
    assert load_text_file(path) == "one\ntwo\x0cthree\x85four\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "contains no text"),
        (b"  \n\n", "contains no text"),
        (b"text\n\x00\x01\x02", ":2: a NUL byte (byte 5): a binary file, not UTF-8 text"),
        (b"caf\xe9\n", ":1: not UTF-8 text (byte 3)"),
    ],
)
def test_an_unusable_txt_corpus_names_the_file_and_line(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    assert text_problems(path) == [f"{path}{'' if message.startswith(':') else ': '}{message}"]


def test_jsonl_lines_are_physical_lines(tmp_path: Path):
    """A raw U+2028 inside a JSON string is legal JSON and no line break; an error after it names line 3."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n\n" + '{"txt": "x", "id": 1}\n', encoding="utf-8")
    assert text_problems(path) == [f"""{path}:3: missing field "text" (the object has fields 'txt', 'id')"""]
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "c"}) + "\r\n", encoding="utf-8")
    assert load_text_file(path) == "a\u2028b\n\nc"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": 1' + "0" * 5000 + "}", "invalid JSON (ValueError)"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON (RecursionError)"),
        ('{"text": null}', 'field "text" must be a string, not a JSON null'),
        ('"just a string"', 'a line must be a JSON object with a "text" field, not a JSON string'),
    ],
)
def test_hostile_jsonl_lines_are_one_line_errors(tmp_path: Path, line: str, message: str):
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert text_problems(path) == [f"{path}:1: {message}"]


def test_read_text_names_a_folder_and_a_missing_file(tmp_path: Path):
    from qbench.cell.data.lines import read_text

    with pytest.raises(DataError, match="is a folder, not a file"):
        read_text(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "absent.txt")


def test_awk_agrees_with_the_caption_count(tmp_path: Path, images: Path):
    if shutil.which("awk") is None:
        pytest.skip("no awk on this machine")
    annotation = tmp_path / "a.tsv"
    annotation.write_text("0.png\tone\x0ctwo\n\n1.png\tthree\u2028four\n", encoding="utf-8")
    awk = subprocess.run(["awk", "-F\t", "NF >= 2 {n++} END {print n}", str(annotation)], capture_output=True, text=True, check=True)
    assert len(load_tsv(annotation, images).captions) == int(awk.stdout) == 2
