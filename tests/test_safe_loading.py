"""safetensors_only is judged from the files from_pretrained will actually load: an index's every shard must be a
.safetensors file inside the checkpoint, in the safetensors format, in a local folder and in a hub cache
snapshot; and while the base loads, torch.load (unpickling) is refused whatever transformers picks."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from qbench.cell import models
from qbench.contract import precisions
from qbench.contract.suite import ModelSpec, SuiteError, load
from qbench.runner import preflight as checks

from .conftest import write_suite
from .helpers import clip

# shard names transformers would open with torch.load (any name not ending in .safetensors), and formats
# qbench does not load at all
NOT_SAFETENSORS = ["pytorch_model-00001-of-00001.bin", "weights.pt", "weights.pth", "model.ckpt", "model.pkl",
                   "flax_model.msgpack", "tf_model.h5", "model.gguf", "weights"]


class Evil:
    """A pickle that runs code when loaded: it writes the file named by QBENCH_TEST_PWNED."""

    def __reduce__(self):
        return (os.system, ("touch \"$QBENCH_TEST_PWNED\"",))


def sharded(folder: Path, source: Path, shards: dict[str, str]) -> Path:
    """`source` with its weights split over `shards` (name -> kind: safetensors, pickle or evil) and named by
    model.safetensors.index.json; no model.safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    names = list(shards)
    weight_map = {key: names[i * len(names) // len(keys)] for i, key in enumerate(keys)}
    for name, kind in shards.items():
        part = {k: v.contiguous() for k, v in state.items() if weight_map[k] == name}
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "safetensors":
            save_file(part, path)
        elif kind == "pickle":
            torch.save(part, path)
        else:
            path.write_bytes(pickle.dumps(Evil()))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard", NOT_SAFETENSORS)
def test_an_index_naming_a_shard_that_is_not_safetensors_is_refused_before_any_cell(tmp_path, tiny_clip_dir, tsv_data_dir, shard):
    folder = sharded(tmp_path / "model", tiny_clip_dir, {"model-00001-of-00002.safetensors": "safetensors", shard: "pickle"})
    problem = models.unsafe_weights_problem(folder, safetensors_only=True)
    assert problem is not None and f"{shard} is " in problem and "(named by model.safetensors.index.json)" in problem
    assert models.unsafe_weights_problem(folder, safetensors_only=False) is None
    with pytest.raises(SuiteError) as raised:
        checks.check_suite(load(write_suite(tmp_path, clip.suite(folder, tsv_data_dir))))
    assert [p for p in raised.value.problems if p.startswith("model.safetensors_only:")] == [f"model.safetensors_only: {problem}"]


def test_shards_outside_the_folder_or_not_in_the_safetensors_format_are_refused(tmp_path, tiny_clip_dir):
    outside = sharded(tmp_path / "outside", tiny_clip_dir, {"../elsewhere.safetensors": "safetensors"})
    assert "../elsewhere.safetensors lies outside the checkpoint folder" in models.unsafe_weights_problem(outside, True)
    renamed = sharded(tmp_path / "renamed", tiny_clip_dir, {"model-00001-of-00001.safetensors": "pickle"})
    assert "model-00001-of-00001.safetensors is not a safetensors file" in models.unsafe_weights_problem(renamed, True)
    single = tmp_path / "single"
    shutil.copytree(tiny_clip_dir, single)
    (single / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0]}))
    assert "model.safetensors is not a safetensors file" in models.unsafe_weights_problem(single, True)
    broken = sharded(tmp_path / "broken", tiny_clip_dir, {"model-00001-of-00001.safetensors": "safetensors"})
    (broken / "model.safetensors.index.json").write_text('{"weight_map": ["not", "a", "map"]}')
    assert "model.safetensors.index.json has no weight_map" in models.unsafe_weights_problem(broken, True)


def test_sharded_safetensors_load_and_the_record_names_the_files(tmp_path, tiny_clip_dir):
    from transformers import CLIPModel

    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    folder = sharded(tmp_path / "model", tiny_clip_dir, dict.fromkeys(names, "safetensors"))
    assert models.unsafe_weights_problem(folder, safetensors_only=True) is None
    assert models.weight_files(folder, safetensors_only=True) == names
    spec = ModelSpec(id=str(folder))
    model = models.load_base(CLIPModel, str(folder), precisions.get("bf16"), "bfloat16", "cpu", spec)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert models.loaded_weight_files(str(folder), spec) == {"model.weight_files": ",".join(names), "model.weight_format": "safetensors"}
    assert models.loaded_weight_files(str(tiny_clip_dir), spec) == {"model.weight_files": "model.safetensors", "model.weight_format": "safetensors"}


def test_while_the_base_loads_no_pickle_is_opened_even_past_the_checks(tmp_path, tiny_clip_dir, monkeypatch):
    from transformers import CLIPModel

    pwned = tmp_path / "pwned"
    monkeypatch.setenv("QBENCH_TEST_PWNED", str(pwned))
    folder = sharded(tmp_path / "model", tiny_clip_dir, {"pytorch_model-00001-of-00001.bin": "evil"})
    monkeypatch.setattr(models, "unsafe_weights_problem", lambda folder, safetensors_only: None)  # as if a check missed it
    with pytest.raises(models.UnsafeWeights, match="transformers tried to load .*pytorch_model-00001-of-00001.bin with torch.load"):
        models.load_base(CLIPModel, str(folder), precisions.get("bf16"), "bfloat16", "cpu", ModelSpec(id=str(folder)))
    assert not pwned.exists()
    import torch

    assert torch.load.__name__ == "load"  # put back after loading


def test_a_hub_cache_snapshot_is_judged_by_the_same_rule(tmp_path, tiny_clip_dir, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    sharded(repo / "snapshots" / commit, tiny_clip_dir, {"pytorch_model-00001-of-00001.bin": "pickle"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    folder = models.checkpoint_folder("acme/tiny-clip")
    assert folder == repo / "snapshots" / commit
    assert "pytorch_model-00001-of-00001.bin is a pickle file" in models.unsafe_weights_problem(folder, True)
