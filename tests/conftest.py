"""Shared fixtures: tiny builtin checkpoints and small suites; nothing here touches a network or a GPU."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Output captured by a test goes to a file, never a terminal: tables and prose are laid out unbounded there unless
# COLUMNS says a width (qbench.cli.render.layout_width). pytest-xdist's workers inherit COLUMNS=80 from it; a test
# that needs a width sets COLUMNS itself.
os.environ.pop("COLUMNS", None)
# A shell that starts pytest in the background (`cmd &` without job control, `nohup`) hands it SIGINT or SIGHUP
# ignored, and its children inherit that: the tests of how a run stops on each signal need them as a terminal has them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

# Randomised tests (hypothesis) run derandomised by default: the same examples every run, so the test command
# passes or fails for the code alone; an example that once failed stays as an explicit @example. The fuzz
# target explores new examples, many more of them: HYPOTHESIS_PROFILE=explore python -m pytest -m fuzz
settings.register_profile("default", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)
EXPLORE_FACTOR = 20  # how many more examples each randomised test tries when exploring


def examples(count: int) -> int:
    """A randomised test's number of examples: `count` in the default tier, EXPLORE_FACTOR times more exploring."""
    return count * EXPLORE_FACTOR if PROFILE == "explore" else count

REPO = Path(__file__).resolve().parent.parent
SUITES = REPO / "suites"


@pytest.fixture(scope="session")
def tiny_clip_path() -> str:
    from qbench.cell import models

    return models.resolve("builtin:tiny-clip")


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    from qbench.cell import models

    return models.resolve("builtin:tiny-llama")


def write_suite(folder: Path, text: str, name: str = "suite.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random tiny CLIP checkpoint built for this test session (tests/helpers/clip.py)."""
    from .helpers import clip

    return clip.checkpoint(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tsv_data_dir(tmp_path_factory) -> Path:
    """images/*.png, train.tsv and eval.tsv for the tiny CLIP (tests/helpers/clip.py)."""
    from .helpers import clip

    folder = tmp_path_factory.mktemp("tsv-data")
    clip.images_tsv(folder, train_images=24, eval_images=12, size=16)
    return folder


@pytest.fixture
def fake_cells(monkeypatch, tmp_path):
    """Runs on this machine start tests/fake_cell.py (a stand-in that writes a plausible record in a moment)
    instead of real cells, each a subprocess (tests/helpers/executors.py: FAKE); FAKE_CELL_CRASH /
    FAKE_CELL_HOLD_S steer it (see its docstring)."""
    from .helpers import executors

    executors.use(monkeypatch, executors.FAKE)
    monkeypatch.setenv("FAKE_CELL_DIR", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_CELL_HOLD_S", "0")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return monkeypatch


@pytest.fixture
def no_cell(monkeypatch):
    """Runs that must stop before any cell: no fork server starts (its imports would be thrown away) and a cell
    that starts fails the test (tests/helpers/executors.py: NO_CELL)."""
    from .helpers import executors

    executors.use(monkeypatch, executors.NO_CELL)


@pytest.fixture
def faulty_cells(monkeypatch):
    """Runs on this machine start the real pipeline with test faults planted (tests/helpers/faulty_cell.py);
    `faulty_cells("nf4-seed0:train:nan:2")` sets the faults (QBENCH_TEST_FAULTS, tests/helpers/faults.py)."""
    from .helpers import executors, faults

    executors.use(monkeypatch, executors.FAULTY)

    def plant(spec: str) -> None:
        monkeypatch.setenv(faults.ENV_VAR, spec)

    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    return plant


def pytest_collection_modifyitems(items):
    """Every randomised (hypothesis) test is part of the fuzz target (`-m fuzz`); it runs in the default tier too."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.fuzz)
# -- the tiers: the default run leaves out the slow tier (tests marked `slow`), which .ci/run runs as a second call --

def pytest_addoption(parser):
    parser.addoption(
        "--slow", action="store_true", default=False,
        help="run the slow tier too (Ray clusters, exploring fuzz, the full-size model, interrupted runs, long real runs); "
             "`-m slow` runs the slow tier alone",
    )


def pytest_configure(config):
    """Without --slow, and unless -m names the slow marker itself, leave the slow tier out (deselected, counted)."""
    chosen = config.option.markexpr
    if config.getoption("--slow", default=False) or re.search(r"\bslow\b", chosen or ""):
        return
    config.option.markexpr = f"({chosen}) and not slow" if chosen else "not slow"


def pytest_report_header(config):
    if re.search(r"\bnot slow\b", config.option.markexpr or ""):
        return "tier: default (the slow tier left out: `pytest -m slow` runs it, `pytest --slow` both)"
    return None
