"""`qbench run --executor ray`: cells as Ray tasks on a local Ray cluster started inside pytest with two
declared (fake) GPUs, checked with the stdlib stand-in cell (tests/fake_cell.py) and, once, real cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from qbench import cli
from qbench.contract import records as results
from qbench.contract.suite import load
from qbench.runner import runner
from qbench.runner.executors import ray_executor, ray_task

from .conftest import REPO, write_suite
from .helpers import clip, executors
from .helpers.listeners import RecordingListener

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module: 4 CPUs and 2 declared GPUs (no real GPU is needed; Ray sets
    CUDA_VISIBLE_DEVICES for each task from the declared ones)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="error",
             object_store_memory=100 * 1024 * 1024)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tsv_suite(tmp_path_factory) -> Path:
    """A suite on a local tiny CLIP folder and real image files (the fake cell never loads them, but the
    checks before any cell do)."""
    root = tmp_path_factory.mktemp("ray-suite")
    checkpoint = clip.checkpoint(root / "ckpt")
    data = clip.images_tsv(root / "data", train_images=6, eval_images=3)
    text = clip.suite(checkpoint, data, ("bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"), name="onray", steps=2,
                      train="batch_size = 4\nlr = 1e-3\nuntimed_steps = 1", evaluation=None)
    return write_suite(root, text)


@pytest.fixture
def fake_cells(monkeypatch, tmp_path):
    """Cells are tests/fake_cell.py, here and on Ray (tests/helpers/executors.py); its settings reach the Ray
    workers like the driver's HF_/OMP_ ones."""
    executors.use(monkeypatch, executors.FAKE)
    monkeypatch.setattr(ray_executor, "FORWARDED_ENV_PREFIXES", (*ray_executor.FORWARDED_ENV_PREFIXES, "FAKE_CELL_"))
    monkeypatch.setenv("FAKE_CELL_DIR", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_CELL_HOLD_S", "0")
    monkeypatch.setenv("FAKE_CELL_CRASH", "")
    return monkeypatch


def ray_run(suite: Path, run_dir: Path, cells, device: str = "cuda", gpus: float = 1.0, **fake_env) -> runner.Run:
    """A run of fake cells on the module's cluster, through the Ray executor."""
    loaded = load(suite)
    env = {"FAKE_CELL_DIR": str(run_dir.parent / "fake"), "FAKE_CELL_HOLD_S": "0", **fake_env}
    executor = executors.FakeCellsOnRay(resources=ray_executor.cell_resources(device, gpus, 1.0))
    return runner.Run(loaded, run_dir, device, cells(loaded), executor, env=env)


def running_now(tmp_path: Path) -> list[str]:
    folder = tmp_path / "fake" / "running"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def wait_for(condition, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- without a cluster ------------------------------------------------------------------------


def test_an_unreachable_address_stops_before_any_cell_with_exit_2_and_one_line(tsv_suite, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "qbench", "run", str(tsv_suite), "--out", str(out), "--executor", "ray",
         "--ray-address", "127.0.0.1:1"], capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: command line: --ray-address 127.0.0.1:1: cannot reach a Ray cluster at 127.0.0.1:1: Connection refused"
    ]
    assert time.monotonic() - started < 60  # Ray alone would wait two minutes
    assert not out.exists()


class _Listener:
    """A server at 127.0.0.1:<port> that speaks something other than Ray: `answer(connection)` per connection."""

    def __init__(self, answer):
        import socket

        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list = []
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)
            self.answer(connection)

    def close(self):
        for connection in [*self.connections, self.server]:
            connection.close()


def _http(connection):  # what Python's http.server says to an HTTP/2 preface (case ray-address-not-ray-hangs)
    connection.recv(1024)
    connection.sendall(b"HTTP/1.0 400 Bad request version ('HTTP/2.0')\r\nContent-Type: text/html\r\n\r\n<html>")


@pytest.mark.parametrize("answer, said", [
    (_http, "no Ray cluster answers there (it does not speak gRPC; it said \"HTTP/1.0 400 Bad request version ('HTTP/2.0')\")"),
    (lambda connection: None, "no Ray cluster answers there (it did not answer the gRPC handshake in 2 s)"),
    (lambda connection: connection.close(), "no Ray cluster answers there (it closed the connection"),
])
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_where_something_else_listens_stops_the_run_in_bounded_time_with_one_line(
        tsv_suite, tmp_path, monkeypatch, capsys, answer, said, scheme):
    monkeypatch.setattr(ray_executor, "CONNECT_TIMEOUT_S", 2.0)
    listener = _Listener(answer)
    started = time.monotonic()
    try:
        code = cli.main(["run", str(tsv_suite), "--out", str(tmp_path / "out"), "--executor", "ray",
                         "--ray-address", f"{scheme}127.0.0.1:{listener.port}"])
    finally:
        listener.close()
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and err.startswith(f"error: command line: --ray-address {scheme}127.0.0.1:{listener.port}: something listens")
    assert said in err and time.monotonic() - started < 30 and not (tmp_path / "out").exists()


def test_a_grpc_server_that_is_no_ray_gcs_nor_ray_client_is_refused():
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for address, asked in ((f"127.0.0.1:{port}", "GetClusterId"), (f"ray://127.0.0.1:{port}", "Ray Client's ping")):
            with pytest.raises(Exception) as refused:
                ray_executor.check_reachable(address, timeout_s=5.0)
            assert refused.value.problems == [f"--ray-address {address}: no Ray cluster answers at 127.0.0.1:{port} ({asked}"
                                              f"{', the first thing Ray asks its GCS,' if asked == 'GetClusterId' else ''} gave "
                                              "UNIMPLEMENTED: Method not found!)"]
    finally:
        server.stop(0)


def test_qbench_imports_ray_only_for_the_ray_executor(tsv_suite, tmp_path):
    """A local run (here one that stops at its checks) and every module on its way never import Ray."""
    script = (
        "import sys\n"
        "from qbench import cli\n"
        "import qbench.runner.executors.ray_executor, qbench.runner.executors.ray_task, qbench.cli.commands\n"
        f"code = cli.main(['run', {str(tsv_suite)!r}, '--out', {str(tmp_path / 'out')!r}, '--shard', '3/2'])\n"
        "assert code == 2, code\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


def test_without_ray_installed_executor_ray_exits_2_with_one_line(tsv_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert cli.main(["run", str(tsv_suite), "--out", str(tmp_path / "out"), "--executor", "ray"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert error.startswith("error: command line: --executor ray: Ray is not installed here")
    assert 'pip install "qbench[ray]"' in error
    assert not (tmp_path / "out").exists()


def test_placement_options_that_do_not_fit_the_executor_exit_2(tsv_suite, tmp_path, capsys):
    cases = {
        ("--executor", "ray", "--gpus", "0,1"): "--gpus picks GPUs of this machine",
        ("--executor", "ray", "--gpus-per-cell", "1.5"): "a whole number of GPUs, or a share of one",
        ("--executor", "ray", "--gpus-per-cell", "2"): 'model.device_map = "auto"',
        ("--executor", "ray", "--device", "cpu", "--gpus-per-cell", "0.5"): "cells on --device cpu take no GPU",
        ("--executor", "ray", "--cpus-per-cell", "0"): "--cpus-per-cell 0: must be more than 0",
        ("--gpus", "0", "--gpus-per-cell", "0.5"): "a share of a GPU needs --executor ray",
        ("--ray-address", "auto"): "--ray-address goes with --executor ray",
        ("--cpus-per-cell", "2"): "--cpus-per-cell goes with --executor ray",
    }
    for options, message in cases.items():
        assert cli.main(["run", str(tsv_suite), "--out", str(tmp_path / "out"), *options]) == 2, options
        assert message in " ".join(capsys.readouterr().err.split()), options
    assert not (tmp_path / "out").exists()


def test_ray_errors_become_error_types_that_say_what_was_lost():
    from ray import exceptions

    assert ray_executor.ray_error_type(exceptions.WorkerCrashedError()) == "RayWorkerDied"
    assert ray_executor.ray_error_type(exceptions.NodeDiedError("node 1 died")) == "RayNodeDied"
    assert ray_executor.ray_error_type(exceptions.TaskCancelledError()) == "Interrupted"
    wrapped = exceptions.RayTaskError("cell_task", "Traceback ...", ModuleNotFoundError("No module named 'qbench'"))
    assert ray_executor.ray_error_type(wrapped.as_instanceof_cause()) == "RayTaskError"


def test_gpu_uuids_are_read_through_nvml_in_visible_order():
    class TwoGpus:  # just enough of pynvml
        def nvmlInit(self): pass
        def nvmlShutdown(self): pass
        def nvmlDeviceGetCount(self): return 2
        def nvmlDeviceGetHandleByIndex(self, index): return index
        def nvmlDeviceGetUUID(self, handle): return f"GPU-{handle}{handle}{handle}{handle}"
        def nvmlDeviceGetName(self, handle): return "fake"

    assert ray_task.gpu_uuids({"CUDA_VISIBLE_DEVICES": "1,0"}, TwoGpus()) == {"env.ray.gpu_uuids": "GPU-1111,GPU-0000"}
    assert ray_task.gpu_uuids({"CUDA_VISIBLE_DEVICES": ""}, TwoGpus())["env.ray.gpu_uuids"] is None
    missing = ray_task.gpu_uuids({"CUDA_VISIBLE_DEVICES": "5"}, TwoGpus())
    assert missing["env.ray.gpu_uuids"] is None and "does not exist" in missing["env.ray.gpu_uuids_reason"]


# --- on the local cluster ---------------------------------------------------------------------


@pytest.mark.slow
def test_cells_spread_over_the_declared_gpus_each_seeing_only_its_own(ray_cluster, tsv_suite, tmp_path):
    run = ray_run(tsv_suite, tmp_path / "run", lambda loaded: loaded.cells()[:4], FAKE_CELL_HOLD_S="1.5")
    records = run.execute()

    assert [r["cell_id"] for r in records] == [c.id for c in run.cells]
    on_disk = {r["cell_id"]: r for r in results.read_records(tmp_path / "run")}
    assert set(on_disk) == {c.id for c in run.cells} and all(r["status"] == "ok" for r in on_disk.values())
    assert {r["env.cuda_visible_devices"] for r in on_disk.values()} == {"0", "1"}  # both GPUs, one each
    for record in on_disk.values():
        assert record["env.executor"] == "ray" and record["env.ray.node_id"] == ray.get_runtime_context().get_node_id()
        assert record["env.ray.gpu_ids"] == record["env.cuda_visible_devices"]  # what Ray gave is what the cell saw
        assert record["env.ray.gpu_uuids"] is None and record["env.ray.gpu_uuids_reason"]  # fake GPUs: no NVML
        assert record["env.ray.node_ip"] and record["env.hostname"]
        assert record["test.device_clashes"] is None  # never two cells on one GPU
    assert max(r["test.peak_running"] for r in on_disk.values()) <= 2
    assert len({r["test.pid"] for r in on_disk.values()}) == 4  # one process per cell
    for cell in run.cells:
        log = (tmp_path / "run" / "logs" / f"{cell.id}.log").read_text()
        assert f"cell {cell.id} started" in log and f"cell {cell.id} ended" in log and ", ok" in log


@pytest.mark.slow
def test_a_cell_no_node_can_hold_stops_the_run_before_it_starts(ray_cluster, tsv_suite, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", str(tsv_suite), "--out", str(out), "--executor", "ray", "--cpus-per-cell", "64"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "no node of the Ray cluster" in error and "room for one cell (1 GPU, 64 CPU)" in error and "4 CPU, 2 GPU" in error
    assert not out.exists()


@pytest.mark.slow
def test_half_a_gpu_per_cell_puts_two_cells_on_each_gpu(ray_cluster, tsv_suite, tmp_path):
    run = ray_run(tsv_suite, tmp_path / "run", lambda loaded: loaded.cells()[:4], gpus=0.5, FAKE_CELL_HOLD_S="1.0")
    records = run.execute()
    assert all(r["status"] == "ok" for r in records)
    assert {r["env.cuda_visible_devices"] for r in records} <= {"0", "1"}
    assert all(r["env.ray.gpu_ids"] == r["env.cuda_visible_devices"] for r in records)


@pytest.mark.slow
def test_without_streaming_as_over_ray_client_each_task_hands_back_everything_when_it_ends(ray_cluster, tsv_suite, tmp_path):
    """Ray Client (ray://) cannot stream a task's items: the same items then come back in one piece."""
    run = ray_run(tsv_suite, tmp_path / "run", lambda loaded: loaded.cells()[:3], FAKE_CELL_CRASH="int8")
    run.executor.stream = False
    records = {r["cell_id"]: r for r in run.execute()}
    assert [records[c]["status"] for c in ("bf16-seed0", "int8-seed0", "fp4-seed0")] == ["ok", "failed", "ok"]
    assert records["int8-seed0"]["error_type"] == "ChildProcessDied" and records["int8-seed0"]["error_phase"] == "train"
    assert {r["env.cuda_visible_devices"] for r in records.values()} <= {"0", "1"}
    assert all(r["env.ray.node_id"] for r in records.values())
    assert "cell bf16-seed0 ended" in (tmp_path / "run" / "logs" / "bf16-seed0.log").read_text()


@pytest.mark.slow
def test_a_real_ray_gcs_passes_the_probe(ray_cluster):
    ray_executor.check_reachable(ray.get_runtime_context().gcs_address)  # raises if the probe took it for another service


@pytest.mark.slow
def test_cpu_cells_ask_for_cpus_and_see_no_gpu(ray_cluster, tsv_suite, tmp_path):
    run = ray_run(tsv_suite, tmp_path / "run", lambda loaded: loaded.cells()[:2], device="cpu")
    assert run.executor.resources.options() == {"num_gpus": 0.0, "num_cpus": 1.0}
    records = run.execute()
    assert all(r["status"] == "ok" and r["env.device"] == "cpu" for r in records)
    assert all(not r["env.cuda_visible_devices"] and r["env.ray.gpu_ids"] is None for r in records)


@pytest.mark.slow
def test_a_cell_process_that_dies_and_a_worker_that_dies_give_failed_records_and_the_run_goes_on(ray_cluster, tsv_suite, tmp_path):
    run = ray_run(tsv_suite, tmp_path / "run", lambda loaded: loaded.cells()[:3], FAKE_CELL_HOLD_S="8", FAKE_CELL_CRASH="int8")
    pids = tmp_path / "fake" / "pids"
    orphans: list[int] = []

    heard = RecordingListener()
    run.listener = heard

    def kill_the_worker_of_fp4() -> None:
        # its cell runs, and the driver has its placement (Ray streams the task's items to the driver on its own
        # schedule: a worker killed before its first item arrived never said where it ran)
        wait_for(lambda: (pids / "fp4-seed0").is_file() and "fp4-seed0" in running_now(tmp_path) and "fp4-seed0" in heard.started())
        cell = psutil.Process(int((pids / "fp4-seed0").read_text()))
        orphans.append(cell.pid)
        os.kill(cell.ppid(), signal.SIGKILL)  # the Ray worker running the task, as if its node lost it

    killer = threading.Thread(target=kill_the_worker_of_fp4, daemon=True)
    killer.start()
    records = {r["cell_id"]: r for r in run.execute()}
    killer.join()
    for pid in orphans:  # the cell of the killed worker (a real cell dies with its parent; the fake one holds on)
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass

    crashed, lost, fine = records["int8-seed0"], records["fp4-seed0"], records["bf16-seed0"]
    assert crashed["status"] == "failed" and crashed["error_type"] == "ChildProcessDied"
    assert crashed["error_returncode"] == 3 and crashed["env.executor"] == "ray"
    assert lost["status"] == "failed" and lost["error_type"] == "RayWorkerDied"
    assert "WorkerCrashedError" in lost["error"] and lost["env.ray.node_id"]
    assert fine["status"] == "ok"
    on_disk = {r["cell_id"]: r for r in results.read_records(tmp_path / "run")}
    assert on_disk == records


@pytest.mark.slow
def test_sigterm_cancels_pending_tasks_stops_running_cells_and_resume_finishes_locally_and_on_ray(
    ray_cluster, tsv_suite, fake_cells, tmp_path
):
    fake_cells.setenv("FAKE_CELL_HOLD_S", "300")
    out = tmp_path / "out"
    signalled: list[float] = []

    def terminate_when_two_cells_run() -> None:
        wait_for(lambda: len(running_now(tmp_path)) == 2)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_two_cells_run, daemon=True).start()
    assert cli.main(["run", str(tsv_suite), "--out", str(out), "--executor", "ray", "--device", "cuda"]) == 143
    assert time.monotonic() - signalled[0] < 120  # the cells' 300 s holds were cut short (the stop's own time, not the start's)
    wait_for(lambda: running_now(tmp_path) == [], 30)  # the running cells' processes were stopped
    (run_dir,) = (out / "onray").iterdir()
    statuses = {r["cell_id"]: r["status"] for r in results.read_records(run_dir)}
    assert sorted(statuses.values()) == ["interrupted", "interrupted"]  # the four others never started
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["executor"] == "ray" and manifest["ray"]["cell_resources"] == {"num_gpus": 1.0, "num_cpus": 1.0}

    fake_cells.setenv("FAKE_CELL_HOLD_S", "0")
    fake_cells.setenv("FAKE_CELL_CRASH", "fp4,nf4")
    assert cli.main(["run", "--resume", str(run_dir)]) == 1  # locally: the interrupted and never-started cells
    records = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert len(records) == 6 and {r["env.executor"] for r in records.values() if r["status"] == "ok"} == {"local"}
    assert sorted(c for c, r in records.items() if r["status"] != "ok") == ["fp4-seed0", "nf4-seed0"]

    fake_cells.setenv("FAKE_CELL_CRASH", "")
    assert cli.main(["run", "--resume", str(run_dir), "--executor", "ray"]) == 0  # and the rest on Ray
    records = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert all(r["status"] == "ok" for r in records.values())
    assert {records[c]["env.executor"] for c in ("fp4-seed0", "nf4-seed0")} == {"ray"}
    resumes = json.loads((run_dir / "run.json").read_text())["resumes"]
    assert [r["executor"] for r in resumes] == ["local", "ray"]
    assert (run_dir / "results.csv").is_file() and (run_dir / "summary.md").is_file()


@pytest.mark.parametrize("stop", [signal.SIGHUP, signal.SIGINT])
def test_every_stop_signal_stops_a_run_on_ray_and_its_records_name_it(ray_cluster, tsv_suite, fake_cells, tmp_path, stop):
    fake_cells.setenv("FAKE_CELL_HOLD_S", "60")

    def stop_when_two_cells_run() -> None:
        wait_for(lambda: len(running_now(tmp_path)) == 2)
        os.kill(os.getpid(), stop)

    threading.Thread(target=stop_when_two_cells_run, daemon=True).start()
    assert cli.main(["run", str(tsv_suite), "--out", str(tmp_path / "out"), "--executor", "ray", "--device", "cuda"]) == 128 + stop
    wait_for(lambda: running_now(tmp_path) == [], 30)
    (run_dir,) = (tmp_path / "out" / "onray").iterdir()
    errors = [r["error"] for r in results.read_records(run_dir)]
    assert len(errors) == 2 and all(stop.name in error and "SIGTERM" not in error for error in errors), errors


# --- real cells: a record does not depend on where it was made ---------------------------------

VOLATILE = ("time.", "speed.", "memory.", "cpu.", "env.", "run_id", "run_session", "error_traceback", "model_path", "readback.weight_error_s")


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


@pytest.mark.slow
def test_real_cells_on_ray_give_the_records_of_the_local_runner(ray_cluster, tmp_path, monkeypatch):
    suite = write_suite(tmp_path, clip.suite(
        precisions=("nf4",), name="same", settings='compute_dtype = "float32"\nbaseline = "nf4"', matrix="seeds = [0]", steps=3,
        train="batch_size = 8\nlr = 1e-3\nwarmup_steps = 0\nuntimed_steps = 1",
        lora='r = 4\nalpha = 8\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]', evaluation="batch_size = 64\nrecall_k = [1, 5]",
    ))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # forwarded to the Ray workers' cells as to local ones
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "local"), "--device", "cpu"]) == 0
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "ray"), "--device", "cpu", "--executor", "ray"]) == 0
    (local_dir,) = (tmp_path / "local" / "same").iterdir()
    (ray_dir,) = (tmp_path / "ray" / "same").iterdir()
    local = {r["cell_id"]: r for r in results.read_records(local_dir)}
    on_ray = {r["cell_id"]: r for r in results.read_records(ray_dir)}
    assert set(local) == set(on_ray) == {"nf4-seed0"}
    for cell_id in local:
        assert comparable(on_ray[cell_id]) == comparable(local[cell_id]), cell_id
        assert local[cell_id]["env.executor"] == "local" and on_ray[cell_id]["env.executor"] == "ray"
        assert on_ray[cell_id]["env.torch_threads"] == local[cell_id]["env.torch_threads"] == 1
        assert on_ray[cell_id]["time.other.wall_s"] >= 0 and on_ray[cell_id]["time.cell.wall_s"] > on_ray[cell_id]["time.train.wall_s"]
        assert set(local[cell_id]) - set(on_ray[cell_id]) == set()  # the Ray record holds every local key ...
        assert {k for k in set(on_ray[cell_id]) - set(local[cell_id])} <= {  # ... and where it ran
            "env.ray.node_id", "env.ray.node_ip", "env.ray.task_id", "env.ray.gpu_ids", "env.ray.gpu_uuids",
            "env.ray.gpu_uuids_reason", "env.ray.worker_pid",
        }
    assert "quality.eval_after.mean_recall@1" in comparable(local["nf4-seed0"])  # the comparison covered quality
    assert cli.main(["report", str(ray_dir), "--out", str(tmp_path / "report")]) == 0
