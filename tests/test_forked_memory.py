"""Memory is the fine-tune's whatever started the cell: a cell forked from the fork server shares the server's pages,
and PSS charges the server half of them; the record adds the server's share back (qbench.cell.measure.forked), so a
forked cell's PSS is what it would hold as its own process, and `qbench compare` judges PSS across launchers."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from qbench.cell.measure import forked
from qbench.cell.measure.sampler import ProcessTree

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux smaps_rollup")

REPO = Path(__file__).resolve().parents[1]


def _fork_sleeper(workers: int = 0) -> int:
    """A child of this process that touches nothing and sleeps (with `workers` children of its own, the same)."""
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(workers):
                if os.fork() == 0:
                    break
            time.sleep(60)
        finally:
            os._exit(0)
    return pid


@pytest.mark.parametrize("workers", [0, 2])
def test_a_forked_child_holds_as_its_own_process_the_anonymous_pages_its_parent_held(workers):
    """A child that only sleeps shares every anonymous page of its parent (the fork server here): its tree is charged
    a fraction of them, and with the server's share added it holds the parent's anonymous PSS before the fork,
    DataLoader-like workers of the child included. (File pages it never touches it never maps: they are not its.)"""
    ballast = bytearray(64 * 2**20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # 64 MiB of anonymous pages, resident
    alone = forked.rollup("self")
    child = _fork_sleeper(workers)
    try:
        time.sleep(0.5)
        share = forked.ServerShare(os.getpid(), alone["Pss_File"], child)
        tree = ProcessTree(child, server_share=share)
        own = tree.pss_bytes()
        members = tree.members()
        tree_files = sum(forked.rollup(pid)["Pss_File"] for pid in members)
        file_loss = max(0, alone["Pss_File"] - forked.rollup("self")["Pss_File"])
        sharers = len(members)  # the tree's processes, each charged a part of every page it shares with the server
        assert sharers == workers + 1
        assert tree.tree_pss - tree_files < (sharers / (sharers + 1) + 0.05) * alone["Pss_Anon"]
        assert own - tree_files - file_loss == pytest.approx(alone["Pss_Anon"], rel=0.03)
        assert share.siblings == 0
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    del ballast


def test_only_a_child_of_the_fork_server_reads_its_share(monkeypatch):
    monkeypatch.setenv(forked.ENV_PID, str(os.getppid()))
    monkeypatch.setenv(forked.ENV_FILE_PSS, "123")
    assert forked.fork_server() == (os.getppid(), 123)
    monkeypatch.setenv(forked.ENV_PID, str(os.getpid()))  # a process that is not this one's parent
    assert forked.fork_server() is None


def _ci_nf4_dq(out: Path, launcher: str) -> dict:
    from qbench import cli
    from qbench.contract import records

    assert cli.main(["run", str(REPO / "suites" / "ci.toml"), "--only", "nf4-dq", "--device", "cpu", "--launcher", launcher,
                     "--out", str(out)]) == 0
    (run_dir,) = (out / "ci").iterdir()
    (record,) = records.read_records(run_dir)
    assert record["status"] == "ok" and record["env.cell_launcher"] == launcher
    return record


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the fork server runs on Linux")
def test_the_ci_nf4_dq_cell_holds_the_same_memory_forked_and_as_its_own_process(tmp_path):
    """The CI suite's nf4-dq cell, twice forked from the fork server and twice as a fresh subprocess: the mean peak
    PSS agree within 8 %, where the PSS of the forked tree alone is some 40 % lower; and compare judges PSS across
    the launchers again, RSS not. Measured: 0.5 % apart on a busy machine, 5-6 % (forked lower) on a quiet one,
    the file pages a fresh process maps as it imports torch (docs/measurement.md); compare's 15 % for CPU memory
    holds that offset."""
    import pandas as pd

    from qbench.analysis.gate import compare

    runs: dict[str, list[dict]] = {"forkserver": [], "subprocess": []}
    for i in range(2):  # interleaved, so that both launchers see the machine alike
        for launcher in runs:
            runs[launcher].append(_ci_nf4_dq(tmp_path / f"{launcher}-{i}", launcher))
    peak = {launcher: sum(r["memory.all_phases.pss_peak_bytes"] for r in records) / 2 for launcher, records in runs.items()}
    assert peak["forkserver"] == pytest.approx(peak["subprocess"], rel=0.08)
    forked_tree = sum(r["memory.all_phases.tree_pss_peak_bytes"] for r in runs["forkserver"]) / 2
    assert forked_tree < 0.8 * peak["subprocess"]
    assert all(r["memory.train.fork_server_share_bytes"] > 0 for r in runs["forkserver"])
    assert all(r["memory.train.fork_server_share_bytes"] is None for r in runs["subprocess"])

    verdict = compare.compare(pd.DataFrame(runs["subprocess"]), pd.DataFrame(runs["forkserver"]))
    rows = verdict.checks.set_index("metric")
    assert rows.loc["memory.all_phases.pss_peak_bytes", "verdict"] in ("ok", "improved", "regression")  # judged, not left out
    assert rows.loc["memory.all_phases.rss_peak_bytes", "verdict"] == compare.NOT_JUDGED
