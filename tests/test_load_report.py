"""A model is the checkpoint it names, or the run stops: transformers' load report (parameters it initialised because
the weights lack them, tensors it dropped, shapes that differ) is read before any cell from the weights' headers, and
again by each cell from its real load; the suite may allow missing or dropped weights by name, and then every record
and the summary name them (transformers#43429, peft#2777: a head the config unties while the weights hold none)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qbench.cell import models
from qbench.contract.suite import ModelSpec, SuiteError, load
from qbench.runner.preflight import check_suite

from .conftest import write_suite
from .helpers import suites


def _copy(source: str, folder: Path, config: dict | None = None, edit=None) -> Path:
    """A copy of a builtin checkpoint with its config.json updated by `config` and its weights changed by `edit`
    (a function of the state dict returning the new one)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(models.resolve(source), folder)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if edit:
        save_file(edit(load_file(folder / "model.safetensors")), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _report(folder: Path, task_class: str = "LlamaForCausalLM") -> models.LoadReport:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    return models.checkpoint_load_report(getattr(transformers, task_class), config, folder, ModelSpec(id=str(folder)))


def _without(*names: str):
    return lambda weights: {k: v for k, v in weights.items() if k not in names}


def test_a_whole_checkpoint_reports_nothing_and_a_tied_head_is_not_missing(tmp_path):
    for source, cls in (("builtin:tiny-llama", "LlamaForCausalLM"), ("builtin:tiny-clip", "CLIPModel")):
        report = _report(Path(models.resolve(source)), cls)
        assert (report.missing, report.unexpected, report.mismatched) == ((), (), ())
    # the builtin Llama ties its head: a lm_head.weight in the file is not needed, and none is there
    assert "lm_head.weight" not in models.safetensors_header(Path(models.resolve("builtin:tiny-llama")) / "model.safetensors")


def test_an_untied_head_without_weights_is_missing(tmp_path):
    folder = _copy("builtin:tiny-llama", tmp_path / "untied", {"tie_word_embeddings": False})
    report = _report(folder)
    assert report.missing == ("lm_head.weight",)
    (line,) = report.problems(ModelSpec(id="x"), folder, None)
    assert line.startswith(f"model.id: {folder}: lm_head.weight is not in the checkpoint's weights")
    assert 'model.allow_missing_weights = ["lm_head.weight"]' in line
    assert report.problems(ModelSpec(id="x", allow_missing_weights=("lm_head.*",)), folder, None) == []


def test_missing_dropped_and_misshapen_tensors_of_a_clip_checkpoint_are_named(tmp_path):
    import torch

    def edit(weights):
        weights = {k: v for k, v in weights.items() if k != "visual_projection.weight"}
        weights["extra_head.weight"] = torch.zeros(2, 2)
        weights["text_projection.weight"] = torch.zeros(3, 5)
        return weights

    folder = _copy("builtin:tiny-clip", tmp_path / "clip", edit=edit)
    report = _report(folder, "CLIPModel")
    assert report.missing == ("visual_projection.weight",)
    assert report.unexpected == ("extra_head.weight",)
    assert len(report.mismatched) == 1 and report.mismatched[0].startswith("text_projection.weight: (3, 5) in the weights")
    assert report.record()["model.missing_weights_count"] == 1 and report.record()["model.unexpected_weights"] == "extra_head.weight"
    lines = report.problems(ModelSpec(id="x", allow_missing_weights=("visual_projection.weight",),
                                      allow_unexpected_weights=("extra_*",)), folder, None)
    assert len(lines) == 1 and "shapes differ" in lines[0]  # a shape that differs is never allowed


def test_a_sharded_checkpoint_is_read_from_every_shard(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy("builtin:tiny-llama", tmp_path / "sharded", {"tie_word_embeddings": False})
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in halves.items():
        save_file({k: weights[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _report(folder).missing == ("lm_head.weight",)


def suite_text(model: Path | str, model_extra: str = "", precisions: str = '["dense", "nf4"]') -> str:
    """The causal-LM suite these tests (and test_ignored_settings, test_perplexity_protocols) run: `model` with
    `model_extra` in its [model] section, the precisions as a TOML list."""
    return suites.causal_lm(
        model, precisions=None, name="headless", settings='compute_dtype = "float32"\nbaseline = "dense"\nthreads = 1',
        steps=3, train="batch_size = 4\nlr = 5e-3\nmax_length = 64\nuntimed_steps = 1",
        lora='r = 8\nalpha = 16\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]',
        evaluation="batch_size = 16\nwindow = 64\nmax_windows = 12", model_extra=model_extra,
        extra=f"[matrix]\nprecisions = {precisions}\n",
    )


def _suite(tmp_path: Path, model: Path, extra: str = "", precisions: str = '["dense", "nf4"]') -> Path:
    return write_suite(tmp_path, suite_text(model, extra, precisions))


def test_the_checks_before_the_run_stop_on_a_missing_weight_and_on_an_allowed_one_bitsandbytes_would_quantize(tmp_path):
    head = _copy("builtin:tiny-llama", tmp_path / "untied", {"tie_word_embeddings": False})
    with pytest.raises(SuiteError) as caught:
        check_suite(load(_suite(tmp_path, head)))
    assert [p for p in caught.value.problems if "lm_head.weight" in p][0].startswith(f"model.id: {head}: lm_head.weight")
    check_suite(load(_suite(tmp_path, head, 'allow_missing_weights = ["lm_head.weight"]')))  # the head stays dense: allowed

    layer = "model.layers.0.self_attn.q_proj.weight"
    no_q = _copy("builtin:tiny-llama", tmp_path / "no-q", edit=_without(layer))
    with pytest.raises(SuiteError) as caught:
        check_suite(load(_suite(tmp_path, no_q, f'allow_missing_weights = ["{layer}"]')))
    assert any(p.startswith(f"model.allow_missing_weights: {layer} would be quantized by the nf4 arm(s)") for p in caught.value.problems)
    check_suite(load(_suite(tmp_path, no_q, f'allow_missing_weights = ["{layer}"]', '["dense"]')))


def test_a_cell_reads_the_report_of_its_own_load_where_the_checks_could_not(tmp_path):
    """Pickle weights (allowed by model.safetensors_only = false) have no header to read before the run: the cell's
    load stops with one line instead, and a quantized layer's allowed missing weight fails clearly, not with an
    AttributeError at its first forward."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qbench.contract import precisions

    folder = _copy("builtin:tiny-llama", tmp_path / "pickled", {"tie_word_embeddings": False})
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    spec = ModelSpec(id=str(folder), safetensors_only=False)
    assert models.checkpoint_load_report(AutoModelForCausalLM, None, folder, spec) is None
    with pytest.raises(models.UnloadedWeights, match="lm_head.weight is not in the checkpoint's weights"):
        models.load_base(AutoModelForCausalLM, str(folder), precisions.get("fp32"), "float32", "cpu", spec)

    layer = "model.layers.0.self_attn.q_proj.weight"
    no_q = _copy("builtin:tiny-llama", tmp_path / "no-q", edit=_without(layer))
    allowed = ModelSpec(id=str(no_q), allow_missing_weights=(layer,))
    model = models.load_base(AutoModelForCausalLM, str(no_q), precisions.get("fp32"), "float32", "cpu", allowed)
    assert model is not None  # dense: transformers' initialised layer runs
    with pytest.raises(models.UnloadedWeights, match="sit in a layer bitsandbytes quantizes"):
        models.load_base(AutoModelForCausalLM, str(no_q), precisions.get("nf4"), "float32", "cpu", allowed)


@pytest.mark.slow
def test_the_handed_case_stops_before_any_cell_and_an_allowed_head_is_named_everywhere(tmp_path, capsys):
    """missing-lm-head-randomly-initialised: `--check` and `run` exit 2 naming the folder and the key, no cell runs;
    allowed, both cells run and every record and the summary name the head transformers initialised."""
    from qbench import cli
    from qbench.contract import records

    head = _copy("builtin:tiny-llama", tmp_path / "untied-no-head", {"tie_word_embeddings": False})
    suite = _suite(tmp_path, head)
    assert cli.main(["run", str(suite), "--check", "--device", "cpu"]) == 2
    assert cli.main(["run", str(suite), "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))
    assert f"model.id: {head}: lm_head.weight is not in the checkpoint's weights" in capsys.readouterr().err

    allowed = _suite(tmp_path, head, 'allow_missing_weights = ["lm_head.weight"]')
    assert cli.main(["run", str(allowed), "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    (run_dir,) = (tmp_path / "out" / "headless").iterdir()
    cells = records.read_records(run_dir)
    assert sorted(r["cell_id"] for r in cells) == ["dense-seed0", "nf4-seed0"]
    assert all(r["status"] == "ok" and r["model.missing_weights"] == "lm_head.weight" for r in cells)
    summary = (run_dir / "summary.md").read_text()
    assert "lm_head.weight — not in the checkpoint's weights: transformers initialised them at random" in summary


def test_a_head_stored_beside_a_tied_config_is_loaded_and_the_record_says_it_is_not_tied(tmp_path):
    """peft#2777 / transformers#45127: the config ties the head while the weights hold one of their own (a merged
    adapter): transformers 5 keeps the stored head, so what ran is an untied model, and the record says so."""
    import torch
    from transformers import AutoModelForCausalLM

    from qbench.cell.readback import _head_tied
    from qbench.contract import precisions

    def with_head(weights):
        return {**weights, "lm_head.weight": torch.randn_like(weights["model.embed_tokens.weight"])}

    folder = _copy("builtin:tiny-llama", tmp_path / "stored-head", edit=with_head)
    assert _report(folder) == models.LoadReport(source=_report(folder).source)  # nothing missing or dropped
    spec = ModelSpec(id=str(folder))
    assert _head_tied(models.load_base(AutoModelForCausalLM, str(folder), precisions.get("fp32"), "float32", "cpu", spec)) is False
    builtin = models.resolve("builtin:tiny-llama")
    assert _head_tied(models.load_base(AutoModelForCausalLM, builtin, precisions.get("fp32"), "float32", "cpu", ModelSpec(id=builtin))) is True
