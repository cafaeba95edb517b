"""The README and docs/ say what this checkout does: every module, name, path, link and command option they
mention exists, the README fits its first screens, and the suite reference lists every suite key."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *PAGES]
README_MAX_LINES = 250
# pages other branches are writing at the same time; a link to one is expected to dangle until it lands
PENDING = {"docs/glossary.md": "the glossary, written with the typed record (branch `record`)"}

_TOP = r"(?:qbench|tests|scripts|suites|benchmarks|docs|results/baselines|\.ci)"
PATH = re.compile(rf"(?<![\w./$~-])({_TOP}/[^\s`'\"()\[\],;:|#]*|pyproject\.toml|tox\.ini|README\.md)")
TEST_NODE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
MODULE_RUN = re.compile(r"python3? -m (qbench[\w.]*)")
DOTTED = re.compile(r"(?<![\w./-])(qbench(?:\.\w+)+)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a command line that starts with qbench (after variables, `time`, `nice`): its subcommand and the rest
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+|time\s+|nice -n \d+\s+)*(?:qbench|python3? -m qbench)\s+([a-z][a-z-]*)(.*)$")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """The code of a Markdown text: fenced blocks, indented blocks (line by line) and inline code spans."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            found.append(line.strip())
        else:
            found += re.findall(r"`([^`]+)`", line)
    return found


def test_the_readme_fits_its_first_screens():
    lines = len(_text(README).splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_the_docs_pages_exist_and_the_readme_links_each():
    readme = _text(README)
    assert len(PAGES) >= 10
    unlinked = [_name(page) for page in PAGES if f"({_name(page)})" not in readme]
    assert not unlinked, f"README.md links no page of: {unlinked}"


def _module_file(dotted: str) -> Path | None:
    """The file of module `dotted` in this checkout (a package: its __init__.py), found without importing it."""
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_python_dash_m_module_runs(document: Path):
    missing = []
    for module in sorted(set(MODULE_RUN.findall(_text(document)))):
        found = _module_file(module)
        runnable = found is not None and (found.name != "__init__.py" or (found.parent / "__main__.py").is_file())
        if not runnable:
            missing.append(module)
    assert not missing, f"{_name(document)}: `python -m` of modules that do not exist or cannot run: {missing}"


@cache
def _top_level_names(module: Path) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def _resolves(dotted: str) -> bool:
    """`dotted` names a module of this checkout, or a name defined at the top of one (a class's member too)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:split]))
        if module is None:
            continue
        rest = parts[split:]
        if not rest:
            return True
        node = _top_level_names(module).get(rest[0])
        if node is None:
            return False
        if len(rest) > 1 and isinstance(node, ast.ClassDef):
            members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
            members |= {t.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(t := n.target, ast.Name)}
            return rest[1] in members
        return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_qbench_dotted_name_exists(document: Path):
    missing = sorted({name for name in DOTTED.findall(_text(document)) if not _resolves(name)})
    assert not missing, f"{_name(document)} names modules or attributes this checkout does not have: {missing}"


def _path_exists(mentioned: str) -> bool:
    path = mentioned.rstrip(".")
    for placeholder in ("<", "{", "NAME", "RUN_ID"):  # results/baselines/ci/<run-id>/: the folder before it
        if placeholder in path:
            path = path[: path.index(placeholder)].rsplit("/", 1)[0]
    if any(ch in path for ch in "*?["):
        return any(ROOT.glob(path))
    return (ROOT / path).exists() or path in PENDING


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_repository_path_exists(document: Path):
    text = _text(document)
    missing = sorted({path for path in PATH.findall(text) if not _path_exists(path)})
    assert not missing, f"{_name(document)} mentions paths this checkout does not have: {missing}"
    tests = [f"{file}::{name}" for file, name in TEST_NODE.findall(text)
             if not re.search(rf"^\s*def {name}\b", _text(ROOT / file), re.MULTILINE)]
    assert not tests, f"{_name(document)} names tests that do not exist: {tests}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def _anchors(page: Path) -> frozenset[str]:
    return frozenset(_slug(line.lstrip("#")) for line in _text(page).splitlines() if re.match(r"#{1,6} ", line))


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_relative_link_and_anchor_resolves(document: Path):
    broken = []
    for target in LINK.findall(_text(document)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        page = (document.parent / file).resolve() if file else document
        if _name(page) in PENDING:
            continue
        if not page.exists() or (anchor and page.suffix == ".md" and anchor not in _anchors(page)):
            broken.append(target)
    assert not broken, f"{_name(document)} has links that lead nowhere: {broken}"


@cache
def _parsers() -> dict[str, dict[str, object]]:
    """Each command line (`run`, `baseline refresh`, ...) -> its option strings."""
    import argparse

    from qbench.cli.parser import build_parser

    def options(parser: argparse.ArgumentParser, prefix: str, into: dict[str, dict[str, object]]) -> None:
        into[prefix] = dict(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    options(child, f"{prefix} {name}".strip(), into)

    found: dict[str, dict[str, object]] = {}
    options(build_parser(), "", found)
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_qbench_command_and_option_exists(document: Path):
    parsers, wrong = _parsers(), []
    for code in _code(_text(document)):
        segments = [segment.strip() for segment in re.split(r"&&|;|\|", code)]
        for command, rest in (m.groups() for segment in segments if (m := COMMAND.match(segment))):
            rest = rest.split(" #")[0]
            try:
                words = shlex.split(rest)
            except ValueError:
                words = rest.split()
            line = command
            if words and f"{command} {words[0]}" in parsers:
                line = f"{command} {words[0]}"
            if line not in parsers:
                wrong.append(f"qbench {command}")
                continue
            wrong += [f"qbench {line} {word}" for word in words
                      if word.startswith("--") and word.split("=")[0] not in parsers[line]]
    assert not wrong, f"{_name(document)} shows commands or options qbench does not have: {sorted(set(wrong))}"


def _suite_reference():
    spec = importlib.util.spec_from_file_location("suite_reference", ROOT / "scripts" / "suite_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_suite_reference_lists_every_suite_key():
    reference, page = _suite_reference(), _text(ROOT / "docs" / "suites.md")
    missing = [key.key for key in reference.keys() if f"`{key.key}`" not in page]
    assert not missing, f"docs/suites.md lacks suite keys {missing}: python scripts/suite_reference.py --write"


def test_the_suite_reference_is_the_one_the_model_gives():
    reference, page = _suite_reference(), _text(ROOT / "docs" / "suites.md")
    assert reference.page_block(page) == reference.markdown(), (
        "docs/suites.md's suite reference differs from qbench/contract/suite.py: python scripts/suite_reference.py --write"
    )


def test_every_suite_key_has_a_meaning():
    missing = [key.key for key in _suite_reference().keys() if not key.meaning]
    assert not missing, f"give these suite keys a Field(description=...) in qbench/contract/suite.py: {missing}"
