"""Where a model comes from: the hub cache, the hub, or a local checkpoint folder; and what is said when none has it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.cell import models

from .conftest import REPO

HUB_ID = "openai/clip-vit-base-patch32"


def test_the_reference_suite_fails_fast_offline_naming_the_model_and_the_fix(tmp_path: Path):
    """`qbench run suites/clip-vit-b32.toml` on a machine without the model: exit 2 before any cell."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache, whatever this machine has
        "PYTHONPATH": str(REPO),
    }
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, "-m", "qbench", "run", "suites/clip-vit-b32.toml", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 2, finished.stderr
    err = " ".join(finished.stderr.split())
    assert f"model.id: model '{HUB_ID}' is not in the local Hugging Face cache ({tmp_path / 'hf-home' / 'hub'})" in err
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in err
    assert f"`hf download {HUB_ID}`" in err and "local checkpoint folder" in err
    assert not out.exists()


def _fake_cache(cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub writes: refs/main -> snapshots/<commit>/config.json."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


def test_a_hub_id_in_the_local_cache_is_available_offline(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_cache(tmp_path, HUB_ID)
    models.ensure_available(HUB_ID)
    with pytest.raises(models.ModelNotFound, match="offline mode is on"):
        models.ensure_available("openai/clip-vit-large-patch14")


def test_an_unreachable_hub_is_asked_once_without_retries(tmp_path: Path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def no_network(url, timeout=None, **kwargs):
        calls.append((url, timeout, kwargs))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    with pytest.raises(models.ModelNotFound, match=re.escape(f"{constants.ENDPOINT} cannot be reached (ConnectionError)")):
        models.ensure_available(HUB_ID)
    assert len(calls) == 1
    url, timeout, kwargs = calls[0]
    assert url.endswith(f"{HUB_ID}/resolve/main/config.json") and timeout == models.HUB_PROBE_TIMEOUT_S
    assert not kwargs.get("retry_on_errors")


def test_a_local_checkpoint_folder_is_used_as_it_is_relative_to_the_suite(tmp_path: Path):
    folder = tmp_path / "checkpoints" / "my-clip"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert models.resolve("checkpoints/my-clip", tmp_path) == str(folder.resolve())
    assert models.resolve(str(folder)) == str(folder.resolve())
    models.ensure_available(str(folder))
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(models.ModelNotFound, match="no config.json"):
        models.resolve("not-a-checkpoint", tmp_path)
    with pytest.raises(models.ModelNotFound, match="does not exist"):
        models.resolve("./checkpoints/missing", tmp_path)
