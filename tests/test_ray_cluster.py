"""A Ray cluster of two nodes on this machine (ray.cluster_utils): a node lost mid-cell gives that cell a
`failed` record saying so, and the run goes on with the cell on the other node."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from qbench.contract import records as results
from qbench.contract.suite import load
from qbench.runner import runner
from qbench.runner.executors import ray_executor

from .conftest import write_suite
from .helpers import clip
from .helpers.executors import FakeCellsOnRay

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

SUITE = clip.suite(
    precisions=("bf16", "nf4"), name="twonodes", matrix="seeds = [0]", steps=3, train="lr = 1e-3",
    lora='r = 4\nalpha = 8\ntarget_modules = ["q_proj", "v_proj"]', evaluation=None,
)


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node, one declared GPU each; yields the second (the one to lose)."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="error")
    cluster.wait_for_nodes()
    yield cluster, doomed
    ray.shutdown()
    cluster.shutdown()


def test_a_node_lost_mid_cell_gives_a_failed_record_and_the_run_goes_on(two_nodes, tmp_path):
    cluster, doomed = two_nodes
    loaded = load(write_suite(tmp_path, SUITE))
    fake = tmp_path / "fake"
    executor = FakeCellsOnRay(resources=ray_executor.cell_resources("cuda", 1, 1))
    run = runner.Run(loaded, tmp_path / "run", "cuda", loaded.cells(), executor,
                     env={"FAKE_CELL_DIR": str(fake), "FAKE_CELL_HOLD_S": "8"})
    cell_pids: list[int] = []

    def lose_the_second_node_when_both_cells_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = fake / "running"
            if running.is_dir() and len(list(running.iterdir())) == 2:
                cell_pids.extend(int(p.read_text()) for p in (fake / "pids").iterdir())
                cluster.remove_node(doomed, allow_graceful=False)
                return
            time.sleep(0.05)

    loser = threading.Thread(target=lose_the_second_node_when_both_cells_run, daemon=True)
    loser.start()
    records = {r["cell_id"]: r for r in run.execute()}
    loser.join()
    for pid in cell_pids:  # the lost node's cell process outlives its raylet here (one machine); end it
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass

    by_status = {r["status"]: r for r in records.values()}
    assert sorted(r["status"] for r in records.values()) == ["failed", "ok"]
    lost, survived = by_status["failed"], by_status["ok"]
    assert lost["error_type"] == "RayNodeDied" and "NodeDiedError" in lost["error"]
    assert lost["env.ray.node_id"] == doomed.node_id != survived["env.ray.node_id"]
    assert lost["error_phase"] == "load"  # the phase the cell had announced when its node went
    assert {r["cell_id"]: r for r in results.read_records(tmp_path / "run")} == records
