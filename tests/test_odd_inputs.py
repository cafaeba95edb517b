"""Inputs from an unlucky machine or filesystem get one line and exit 2 before any cell, naming what they are:
data paths that are FIFOs, devices, folders, links that loop or lead nowhere; non-ASCII paths under an ASCII
locale; an --out so deep that the run's files would pass PATH_MAX; a cache or checkpoint folder that is a file or
read-only; and a suite of any size the parser accepts runs through the fork server (its messages are not bound
by the socket's packet size)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract.exitcodes import Exit
from qbench.runner import forkserver

from .conftest import REPO, write_suite
from .helpers import clip


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) >= 1, err
    return " ".join(err.split())


# --- data paths that are not files ----------------------------------------------------------------------

ODD = {
    "fifo": (lambda path: os.mkfifo(path), "is a FIFO (named pipe), not a file"),
    "folder": (lambda path: path.mkdir(), "is a folder, not a file"),
    "loop": (lambda path: path.symlink_to(path.name), "is a symbolic link that loops back on itself"),
    "dangling": (lambda path: path.symlink_to("nowhere.tsv"), "is a symbolic link to nowhere.tsv, which does not exist"),
    "device": (lambda path: path.symlink_to("/dev/zero"), "is a character device, not a file"),
}


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    return clip.images_tsv(tmp_path / "data", train_images=8, eval_images=2, size=16)


@pytest.mark.parametrize("kind", sorted(ODD))
def test_an_annotation_file_that_is_no_file_is_named_as_what_it_is(tmp_path, data, capsys, kind):
    make, said = ODD[kind]
    data["eval"].unlink()
    make(data["eval"])
    suite = write_suite(tmp_path, clip.suite(data=data))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--check"]) == Exit.BAD_INPUT
    assert f"data.eval: {data['eval']} {said}" in one_error(capsys)


@pytest.mark.parametrize("kind", ["fifo", "folder", "loop", "dangling"])
def test_an_image_that_is_no_file_is_named_as_what_it_is(tmp_path, data, capsys, kind):
    make, said = ODD[kind]
    image = data["images"] / "eval-001.png"
    image.unlink()
    make(image)
    suite = write_suite(tmp_path, clip.suite(data=data))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--check"]) == Exit.BAD_INPUT
    err = one_error(capsys)
    assert ("image path 'eval-001.png'" if kind == "loop" else "image 'eval-001.png'") in err
    assert ("loops back on itself" if kind == "loop" else said) in err
    assert "not found" not in err or kind == "dangling"


def test_an_image_root_that_is_a_file_or_a_fifo_is_named(tmp_path, data, capsys):
    images = tmp_path / "fifo-images"
    os.mkfifo(images)
    suite = write_suite(tmp_path, clip.suite(data={**data, "images": images}))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--check"]) == Exit.BAD_INPUT
    assert f"data.image_root: {images} is a FIFO (named pipe), not a folder" in one_error(capsys)


def test_a_huge_image_is_one_line_not_pils_raw_warning(tmp_path, data, capsys):
    from PIL import Image

    Image.new("L", (9500, 9500)).save(data["images"] / "eval-001.png")  # 90 M pixels: PIL's bomb warning, no error
    suite = write_suite(tmp_path, clip.suite(data=data))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--check"]) == Exit.BAD_INPUT
    err = capsys.readouterr().err
    assert "DecompressionBombWarning: Image size (90250000 pixels) exceeds limit" in " ".join(err.split())
    assert all(line.startswith("error: ") for line in err.strip().splitlines()), err


@pytest.mark.skipif(sys.platform != "linux", reason="the C locale's ASCII file system encoding is Linux's")
def test_non_ascii_paths_that_exist_are_found_under_an_ascii_locale(tmp_path: Path):
    data = clip.images_tsv(tmp_path / "données", train_images=8, eval_images=2, size=16)
    (data["images"] / "train-000.png").rename(data["images"] / "café.png")
    data["train"].write_text(data["train"].read_text().replace("train-000.png", "café.png", 1))
    suite = write_suite(tmp_path, clip.suite(data=data))
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(REPO)}
    check = [sys.executable, "-m", "qbench", "run", str(suite), "--out", str(tmp_path / "out"), "--check"]
    done = subprocess.run(check, capture_output=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr.decode()
    data["train"].write_text(data["train"].read_text().replace("café.png", "naïve.png", 1))
    done = subprocess.run(check, capture_output=True, env=env, timeout=300, cwd=REPO)
    err = done.stderr.decode("ascii")  # the terminal's encoding: nothing else reaches it
    assert done.returncode == 2 and "Traceback" not in err
    assert "donn\\xe9es/train.tsv:1: image 'na\\xefve.png' not found under" in err


# --- where the run writes ---------------------------------------------------------------------------------


def test_an_out_too_deep_for_path_max_is_refused_before_any_check(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, clip.suite(precisions=("bf16",)))
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    deep = tmp_path
    while len(str(deep).encode()) < path_max - 100:
        deep = deep / ("d" * 200)
    assert cli.main(["run", str(suite), "--out", str(deep), "--check"]) == Exit.BAD_INPUT
    err = one_error(capsys)
    assert "is too deep: the run's files would have paths of up to" in err and f"this system's {path_max:,} (PATH_MAX)" in err
    assert not (tmp_path / ("d" * 200)).exists()


@pytest.mark.parametrize("module, argv", [("qbench.zoo.smollm2", []), ("qbench.zoo.llama", ["--out"]),
                                          ("qbench.zoo.full_scale", [])])
def test_a_conversion_or_checkpoint_folder_that_is_a_file_is_one_line(tmp_path: Path, module: str, argv: list[str]):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    folder = taken / "sub"
    env = {**os.environ, "PYTHONPATH": str(REPO), "QBENCH_CACHE": str(folder)}
    done = subprocess.run([sys.executable, "-m", module, *(argv + [str(folder)] if module != "qbench.zoo.smollm2" else [])],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and f"{taken} is not a folder" in done.stderr
    assert taken.read_text() == "not a folder"


def test_a_read_only_cache_folder_is_one_line(tmp_path: Path):
    from qbench.zoo import smollm2

    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        if os.access(cache, os.W_OK):
            pytest.skip("this user writes in read-only folders (root)")
        with pytest.raises(smollm2.NotReady, match=f"cannot write in the cache folder {cache} \\(read-only or no permission"):
            smollm2.convert(cache)
    finally:
        cache.chmod(0o755)


# --- the fork server's messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 300 * 1024, 10 * 1024 * 1024])  # the case's 300 KB suite, and a 10 MB one
def test_fork_server_messages_of_any_size_arrive_whole_with_their_descriptors(size: int):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read, write = os.pipe()
    try:
        message = {"op": "warm", "suite_text": "# " + "y" * size, "suite_path": "s.toml"}
        sent = {}

        def receive():
            sent["message"], sent["fds"] = forkserver.receive(theirs, max_fds=3)

        import threading

        receiver = threading.Thread(target=receive)
        receiver.start()
        forkserver.send(ours, message, [write])
        receiver.join(timeout=60)
        assert sent["message"] == message and len(sent["fds"]) == 1
        os.write(sent["fds"][0], b"through")  # the descriptor that came with it is the pipe's writing end
        assert os.read(read, 7) == b"through"
        os.close(sent["fds"][0])
    finally:
        for fd in (read, write):
            os.close(fd)
        ours.close()
        theirs.close()


@pytest.mark.slow
def test_a_suite_larger_than_a_socket_packet_is_warmed_by_the_fork_server(tmp_path: Path):
    from qbench.runner.launch import ForkServerLauncher

    text = clip.suite(precisions=("bf16",)) + "".join(f"# {'y' * 98}\n" for _ in range(3000))  # about 300 KB
    assert len(text) > 212_992  # more than a packet of the default send buffer holds
    server = ForkServerLauncher()
    try:
        server.ready()
        warmed = server.warm(text, str(tmp_path / "suite.toml"), "cpu")
        assert "error" not in warmed, json.dumps(warmed)[:400]
    finally:
        server.close()
