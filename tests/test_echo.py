"""Whatever text qbench echoes (a path, a name, a caption, an error, a cell's fault spec) is printed as it is:
rich markup ("[bold]", "[/]") and emoji codes (":fire:") never rewrite it (case error-lines-render-emoji-codes).
The command line escapes every interpolated text (`render.echo`) and shows table cells as plain Text; a test
reads the CLI's source so that a new print cannot forget it."""

from __future__ import annotations

import ast
import io
from pathlib import Path
from unittest import mock

import pandas as pd
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rich.console import Console

from qbench import cli
from qbench.cli import render
from qbench.contract.exitcodes import Exit

from .conftest import REPO, write_suite
from .helpers import clip

# the calls that hand a string to rich as markup, and the keyword arguments that do
SINKS = {"print", "Rule", "add_task", "update", "out", "log", "status"}
MARKUP_KEYWORDS = ("description", "title")
HOSTILE = st.text(st.sampled_from("[]/:\\ab fire smile bold red link=x.png@#é\U0001f525"), max_size=40)


def interpolations(path: Path) -> list[tuple[int, str]]:
    """(line, expression) of every value an f-string hands to a rich sink without `echo(...)`, `len(...)` or a
    format spec (a number)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name not in SINKS:
            continue
        for argument in [*node.args, *(k.value for k in node.keywords if k.arg in MARKUP_KEYWORDS)]:
            for part in ast.walk(argument):
                if not isinstance(part, ast.JoinedStr):
                    continue
                for value in part.values:
                    if not isinstance(value, ast.FormattedValue) or value.format_spec is not None:
                        continue
                    call = value.value
                    if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) in ("echo", "len")):
                        found.append((part.lineno, ast.unparse(call)))
    return found


def test_every_text_the_command_line_interpolates_into_rich_markup_is_escaped():
    unescaped = {str(path.relative_to(REPO)): found for path in sorted((REPO / "qbench" / "cli").glob("*.py"))
                 if (found := interpolations(path))}
    assert unescaped == {}, "interpolate with render.echo(...) (or a format spec for a number)"


def test_the_source_reader_finds_an_unescaped_interpolation(tmp_path: Path):
    source = tmp_path / "x.py"
    source.write_text('console.print(f"a {path} b {echo(path)} {n:d}")\nTable(title=f"{name}")\n')
    assert interpolations(source) == [(1, "path")]  # a Table's title is not a sink: plain(...) is asked for there


def shown(print_it) -> str:
    """What rich writes for `print_it(console)` on a wide console that is no terminal."""
    out = io.StringIO()
    console = Console(file=out, width=10_000, emoji=False)
    print_it(console)
    return out.getvalue()


@settings(deadline=None)
@given(text=HOSTILE)
@example(text="photos:fire:/x:smile:.png")  # the case's path
@example(text="nf4-seed0:train:error")  # a fault spec: ":train:" is an emoji name
@example(text="[bold]x[/] and [/] alone and [link=file:///etc]y[/link]")
@example(text="\\[escaped] and a trailing \\")
def test_an_echoed_text_is_printed_as_it_is(text):
    out = io.StringIO()
    with mock.patch.object(render, "errors", Console(file=out, width=10_000, emoji=False)):
        render.error(f"data.train: image {text!r} not found")
    assert out.getvalue() == f"error: data.train: image {render.one_line(repr(text))} not found\n"
    word = f"<{text.strip()}>"  # a table cell, its header and its row name hold the text as it is
    frame = pd.DataFrame({f"h{word}": [f"v{word}"]}, index=pd.Index([f"r{word}"], name="arm"))
    written = shown(lambda console: [console.print(t) for t in render.table(frame, f"t{word}")])
    assert all(f"{kind}{word}" in written for kind in "hvrt"), written


def test_the_command_line_consoles_never_turn_emoji_codes_into_pictures():
    assert render.console._emoji is False and render.errors._emoji is False


def test_a_path_with_emoji_codes_is_named_as_it_is_in_the_file(tmp_path: Path, capsys):
    data = clip.images_tsv(tmp_path / "data", train_images=8, eval_images=2, size=16)
    lines = data["train"].read_text().splitlines()
    lines[0] = "photos:fire:/x:smile:.png\t" + lines[0].split("\t", 1)[1]
    data["train"].write_text("\n".join(lines) + "\n")
    suite = write_suite(tmp_path, clip.suite(data=data))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--check"]) == Exit.BAD_INPUT
    err = " ".join(capsys.readouterr().err.split())
    assert f"{data['train']}:1: image 'photos:fire:/x:smile:.png' not found under {data['images']}" in err
    assert "\U0001f525" not in err and "\U0001f604" not in err
    suite = write_suite(tmp_path, clip.suite(data=data, name="[bold]emoji:smile:[/]"))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--check"]) == Exit.BAD_INPUT
    assert "(got '[bold]emoji:smile:[/]')" in capsys.readouterr().err
