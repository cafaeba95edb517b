"""The contrastive batch is a figure (sentence-transformers#1822, open_clip#267): gradient accumulation does not give
a CLIP query the negatives of the other micro-batches. Records say how many negatives each query had;
train.contrastive_batch = "step" keeps every micro-batch's (open_clip's --accum-freq: features cached, the loss
recomputed over all of them), and the memory advice no longer calls a smaller batch harmless."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qbench.contract.suite import LoadedSuite, SuiteError, parse

from .helpers import clip


def suite_text(batch: int, accum: int, extra: str = "") -> str:
    """The dense tiny CLIP, 12 steps of `batch` examples in `accum` micro-batches; `extra`: more [train] keys."""
    train = "\n".join(line for line in (f"batch_size = {batch}", f"grad_accum = {accum}", extra, "lr = 2e-3",
                                         'scheduler = "cosine"', "warmup_steps = 2", "max_length = 16", "untimed_steps = 2") if line)
    return clip.suite(
        precisions=("dense",), name="clipga", settings='compute_dtype = "float32"\nbaseline = "dense"\nthreads = 1', steps=12,
        train=train, lora='r = 8\nalpha = 16\ndropout = 0.0\ntarget_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]',
        evaluation="batch_size = 256\nrecall_k = [1, 5, 10]",
    )


def loaded(batch: int, accum: int, extra: str = "") -> LoadedSuite:
    text = suite_text(batch, accum, extra)
    return LoadedSuite(parse(text, "s.toml"), Path("s.toml"), "0" * 64, text)


def _task_and_model(suite: LoadedSuite):
    from qbench.cell import lora, models
    from qbench.cell.tasks import get_task
    from qbench.contract import precisions

    path = models.resolve(suite.suite.model.id)
    task = get_task(suite, path, "cpu")
    task.prepare_data()
    model = models.load_base(task.model_class, path, precisions.get("fp32"), "float32", "cpu", suite.suite.model)
    model = lora.attach(lora.prepare(model, suite.suite), suite.suite, task.peft_task_type, 0)
    model.train()
    return task, model


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_records_say_how_many_negatives_each_query_had():
    from qbench.cell.tasks.clip import ClipTask

    for batch, accum, extra, size in ((32, 1, "", 32), (8, 4, "", 8), (8, 4, 'contrastive_batch = "step"', 32)):
        task = ClipTask(loaded(batch, accum, extra), "unused", "cpu")
        fields = task.contrastive_fields()
        assert (fields["train.contrastive_batch_size"], fields["train.negatives_per_query"]) == (size, size - 1)
    assert ClipTask(loaded(8, 4), "unused", "cpu").contrastive_fields()["train.contrastive_batch"] == "micro_batch"


def test_accumulating_over_cached_features_is_the_loss_and_gradient_of_the_whole_step():
    """8 x 4 with contrastive_batch = "step" gives the loss of the same 32 pairs as one batch and its gradient; plain
    accumulation of 8 x 4 gives another loss (four losses over 8 pairs) and another gradient."""
    from qbench.cell.data.pairs import CaptionPairs
    from qbench.cell.tasks.batch import Batch
    from qbench.cell.train import mean_of_micro_batches

    task, model = _task_and_model(loaded(8, 4, 'contrastive_batch = "step"'))
    pairs = CaptionPairs(task.train_split, indices=task.train_pixels is not None)
    whole = task._collate([pairs[i] for i in range(32)])
    micro = [Batch({k: v[8 * j : 8 * (j + 1)] for k, v in whole.inputs.items()}, 8, 0) for j in range(4)]

    one_batch = task.loss(model, whole)
    one_batch.backward()
    reference = _grads(model)
    step_loss, samples, _ = task.step_over_cached_features(model, iter(micro))
    cached = _grads(model)
    plain_loss, _, _ = mean_of_micro_batches(task.loss, 4)(model, iter(micro))
    plain = _grads(model)

    assert samples == 32
    assert math.isclose(step_loss, one_batch.item(), rel_tol=1e-5)
    assert all(torch.allclose(cached[n], reference[n], rtol=1e-4, atol=1e-7) for n in reference)
    assert abs(plain_loss - one_batch.item()) > 0.1  # the micro-batches' own negatives: a smaller, easier loss
    assert not all(torch.allclose(plain[n], reference[n], rtol=1e-2, atol=1e-5) for n in reference)


def test_a_contrastive_setting_outside_clip_is_refused():
    text = suite_text(8, 4, 'contrastive_batch = "step"').replace('task = "clip"', 'task = "causal_lm"')
    text = text.replace('name = "shapes"', 'name = "pydoc"').replace("recall_k = [1, 5, 10]", "").replace("builtin:tiny-clip", "builtin:tiny-llama")
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    assert "train.contrastive_batch: a setting of contrastive (clip) training; causal_lm has no negatives" in caught.value.problems


def test_the_memory_advice_for_clip_says_a_smaller_batch_has_fewer_negatives():
    from types import SimpleNamespace

    from qbench.runner import estimate

    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=224, patch_size=32, hidden_size=768))
    huge = loaded(8, 4).suite.model_copy(update={"train": loaded(8, 4).suite.train.model_copy(update={"batch_size": 65_536})})
    (line,) = [p for p in estimate.memory_problems(huge, config, 150_000_000, "cpu") if p.startswith("train.batch_size")]
    assert "keeps the effective batch" not in line
    assert "cuts each query's negatives (train.batch_size - 1)" in line and 'train.contrastive_batch = "step"' in line
    step = huge.model_copy(update={"train": huge.train.model_copy(update={"contrastive_batch": "step"})})
    (line,) = [p for p in estimate.memory_problems(step, config, 150_000_000, "cpu") if p.startswith("train.batch_size")]
    assert "raise train.grad_accum as much" in line


@pytest.mark.slow
def test_the_handed_case_records_its_contrastive_batch_and_step_accumulation_matches_one_batch(tmp_path):
    """clip-grad-accum-shrinks-contrastive-batch: 32 x 1, 8 x 4 and 8 x 4 over the step's features. The records say
    31, 7 and 31 negatives per query; the first loss of 8 x 4 is near ln 8, that of 32 x 1 and of 8 x 4 with
    contrastive_batch = "step" near ln 32 and equal to each other (the same 32 pairs, the same adapters)."""
    from qbench import cli
    from qbench.contract import records

    found = {}
    for name, (batch, accum, extra) in {"accum1": (32, 1, ""), "accum4": (8, 4, ""),
                                       "step4": (8, 4, 'contrastive_batch = "step"')}.items():
        suite = tmp_path / f"{name}.toml"
        suite.write_text(suite_text(batch, accum, extra))
        assert cli.main(["run", str(suite), "--device", "cpu", "--out", str(tmp_path / name)]) == 0
        (run_dir,) = (tmp_path / name / "clipga").iterdir()
        (found[name],) = records.read_records(run_dir)
    assert [found[n]["train.negatives_per_query"] for n in ("accum1", "accum4", "step4")] == [31, 7, 31]
    assert abs(found["accum4"]["train.first_loss"] - math.log(8)) < abs(found["accum4"]["train.first_loss"] - math.log(32))
    assert math.isclose(found["step4"]["train.first_loss"], found["accum1"]["train.first_loss"], rel_tol=1e-5)
