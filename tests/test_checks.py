"""Checks before any cell: data files line by line, the model folder, LoRA targets, safe weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qbench import cli
from qbench.cell import models
from qbench.cell.data.pairs import DataError
from qbench.cell.data.tsv import load_tsv
from qbench.contract.suite import SuiteError, load
from qbench.runner import preflight as checks

from .conftest import write_suite
from .helpers import clip


def check_problems(path: Path, check_model: bool = True) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        checks.check_suite(load(path), check_model=check_model)
    return caught.value.problems


def test_a_good_suite_passes_every_check(tmp_path: Path, tiny_clip_dir: Path, tsv_data_dir: Path):
    checks.check_suite(load(write_suite(tmp_path, clip.suite(tiny_clip_dir, tsv_data_dir, name="robust"))))


def test_missing_data_files_and_image_root_are_named(tmp_path: Path, tiny_clip_dir: Path):
    absent = tmp_path / "nowhere"
    problems = check_problems(write_suite(tmp_path, clip.suite(tiny_clip_dir, absent, name="robust")), check_model=False)
    assert problems == [
        f"data.train: file not found: {absent / 'train.tsv'}",
        f"data.eval: file not found: {absent / 'eval.tsv'}",
        f"data.image_root: folder not found: {absent / 'images'}",
    ]


# -- TSV annotation files -------------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path: Path, tsv_data_dir: Path) -> Path:
    root = tmp_path / "images"
    shutil.copytree(tsv_data_dir / "images", root)
    (root / "garbage.png").write_bytes(b"this is not a picture")
    good = (root / "train-000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "outside.png").write_bytes(good)
    return root


def tsv_problems(annotation: Path, image_root: Path, **options) -> list[str]:
    with pytest.raises(DataError) as caught:
        load_tsv(annotation, image_root, **options)
    return str(caught.value).splitlines()


def test_every_bad_tsv_line_is_reported_with_file_and_line(tmp_path: Path, image_root: Path):
    annotation = tmp_path / "bad.tsv"
    annotation.write_text(
        "train-000.png\ta red square\n"  # 1 fine
        "train-001.png a caption without a tab\n"  # 2
        "train-002.png\t   \n"  # 3 empty caption
        "\n"  # 4 blank: skipped
        "missing.png\ta caption\n"  # 5
        "../outside.png\tescapes the root\n"  # 6
        f"{image_root / 'train-003.png'}\tabsolute\n"  # 7
        "sub/../../outside.png\tescapes too\n"  # 8
        "\tno image path\n",  # 9
        encoding="utf-8",
    )
    problems = tsv_problems(annotation, image_root)
    assert problems == [
        f"{annotation}:2: no tab between image path and caption",
        f"{annotation}:3: empty caption",
        f"{annotation}:5: image 'missing.png' not found under {image_root}",
        f"{annotation}:6: image path '../outside.png' escapes the image root {image_root}",
        f"{annotation}:7: image path '{image_root / 'train-003.png'}' is absolute; paths must be relative to the image root",
        f"{annotation}:8: image path 'sub/../../outside.png' escapes the image root {image_root}",
        f"{annotation}:9: empty image path",
    ]


def test_a_symlink_out_of_the_image_root_is_refused(tmp_path: Path, image_root: Path):
    (image_root / "link.png").symlink_to(tmp_path / "outside.png")
    annotation = tmp_path / "link.tsv"
    annotation.write_text("link.png\ta caption\n", encoding="utf-8")
    assert tsv_problems(annotation, image_root) == [f"{annotation}:1: image path 'link.png' escapes the image root {image_root}"]


def test_unreadable_images_are_reported_with_the_line_that_names_them(tmp_path: Path, image_root: Path):
    annotation = tmp_path / "images.tsv"
    annotation.write_text("train-000.png\tfine\ngarbage.png\tnot an image\ntruncated.png\tcut in half\n", encoding="utf-8")
    load_tsv(annotation, image_root)  # existence only: passes
    problems = tsv_problems(annotation, image_root, decode_images=True)
    assert len(problems) == 2
    assert problems[0].startswith(f"{annotation}:2: image 'garbage.png' is unreadable (UnidentifiedImageError")
    assert problems[1].startswith(f"{annotation}:3: image 'truncated.png' is unreadable (")


def test_an_annotation_file_that_is_not_utf8_names_the_line(tmp_path: Path, image_root: Path):
    annotation = tmp_path / "latin.tsv"
    annotation.write_bytes("train-000.png\tfine\ntrain-001.png\tcaf\xe9\n".encode("latin-1"))
    assert tsv_problems(annotation, image_root) == [f"{annotation}:2: not UTF-8 text (byte 36)"]


def test_tsv_problems_reach_the_command_line_as_one_line_each(tmp_path: Path, tiny_clip_dir: Path, image_root: Path, capsys, no_cell):
    data = image_root.parent
    (data / "train.tsv").write_text("train-000.png\tfine\ngarbage.png\tbroken\n", encoding="utf-8")
    (data / "eval.tsv").write_text("eval-000.png\n", encoding="utf-8")
    suite = write_suite(tmp_path, clip.suite(tiny_clip_dir, data, name="robust"))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 3)[2] for line in lines] == ["data.train", "data.eval"]
    assert f"{data / 'train.tsv'}:2: image 'garbage.png' is unreadable" in lines[0]
    assert lines[1].endswith(f"{data / 'eval.tsv'}:1: no tab between image path and caption")
    assert not (tmp_path / "out").exists()


# -- the model: config, LoRA targets, safe weights ------------------------------------------------


def test_lora_targets_are_checked_against_the_model_modules(tmp_path: Path, tiny_clip_dir: Path, tsv_data_dir: Path):
    text = clip.suite(tiny_clip_dir, tsv_data_dir, name="robust").replace('["q_proj", "v_proj"]', '["q_prj", "encoder", "self_attn.k_proj", "fc1"]')
    problems = check_problems(write_suite(tmp_path, text))
    assert len(problems) == 2
    assert problems[0].startswith("lora.target_modules: 'q_prj' is not a module of the model (did you mean 'q_proj'?); layers LoRA can wrap: ")
    assert problems[1].startswith("lora.target_modules: 'encoder' names CLIPEncoder modules, which LoRA cannot wrap")
    checks.check_suite(load(write_suite(tmp_path, text.replace('"q_prj", "encoder", ', '"all-linear", '))))


def test_a_broken_config_json_is_one_line_not_a_traceback(tmp_path: Path, tiny_clip_dir: Path, tsv_data_dir: Path, capsys, no_cell):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "config.json").write_text('{"model_type": "clip", ', encoding="utf-8")
    suite = write_suite(tmp_path, clip.suite(broken, tsv_data_dir, name="robust"))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {suite}: model.id: cannot build the model from {broken}/config.json (OSError: ")
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}', encoding="utf-8")
    (problem,) = check_problems(suite)
    assert problem.startswith("model.id: cannot build the model from") and "ValueError" in problem


def test_a_folder_without_config_json_or_a_missing_folder_is_named(tmp_path: Path, tsv_data_dir: Path):
    (tmp_path / "empty").mkdir()
    problems = check_problems(write_suite(tmp_path, clip.suite(tmp_path / "empty", tsv_data_dir, name="robust")))
    assert problems == [f"model.id: {tmp_path / 'empty'} is not a Hugging Face checkpoint folder (no config.json)"]
    problems = check_problems(write_suite(tmp_path, clip.suite(tmp_path / "gone", tsv_data_dir, name="robust")))
    assert problems == [f"model.id: model folder {tmp_path / 'gone'} does not exist"]


@pytest.fixture
def pickle_only(tmp_path: Path, tiny_clip_dir: Path) -> Path:
    """The tiny checkpoint with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_clip_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_only_weights_are_refused_unless_the_suite_allows_them(tmp_path: Path, pickle_only: Path, tsv_data_dir: Path):
    suite = write_suite(tmp_path, clip.suite(pickle_only, tsv_data_dir, name="robust"))
    (problem,) = check_problems(suite)
    assert problem.startswith(f"model.safetensors_only: {pickle_only} holds only pickle weights (pytorch_model.bin)")
    assert "model.safetensors_only = false" in problem
    allowed = clip.suite(pickle_only, tsv_data_dir, name="robust").replace(f'id = "{pickle_only}"', f'id = "{pickle_only}"\nsafetensors_only = false')
    checks.check_suite(load(write_suite(tmp_path, allowed, "allowed.toml")))


def test_config_naming_pickle_weights_is_refused(tmp_path: Path, tiny_clip_dir: Path):
    folder = tmp_path / "explicit"
    shutil.copytree(tiny_clip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "weights.bin"}))
    problem = models.unsafe_weights_problem(folder, safetensors_only=True)
    assert problem is not None and "transformers_weights = 'weights.bin'" in problem
    assert models.unsafe_weights_problem(folder, safetensors_only=False) is None
    assert models.unsafe_weights_problem(tiny_clip_dir, safetensors_only=True) is None


def test_loading_refuses_pickle_weights_even_without_the_checks(pickle_only: Path):
    from transformers import CLIPModel

    from qbench.contract import precisions
    from qbench.contract.suite import ModelSpec

    with pytest.raises(models.UnsafeWeights, match="holds only pickle weights"):
        models.load_base(CLIPModel, str(pickle_only), precisions.get("bf16"), "bfloat16", "cpu", ModelSpec(id=str(pickle_only)))
