"""A setting that would take no effect is refused before any cell with one line, or applied as the suite says and
recorded: transformers' constant schedule ignores warm-up, causal_lm starts no DataLoader workers, clip has no
perplexity windows, builtin data reads no files, peft's k-bit preparation turns gradient checkpointing on for
quantized bases only."""

from __future__ import annotations

import pytest

from qbench.contract.suite import SuiteError, parse

from .helpers import clip
from .test_load_report import suite_text as llm_suite_text


def problems_of(text: str) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    return caught.value.problems


def llm(model_extra: str = "", precisions: str = '["dense", "nf4"]') -> str:
    return llm_suite_text("builtin:tiny-llama", model_extra, precisions)


@pytest.mark.parametrize(("text", "expected"), [
    (llm().replace("lr = 5e-3", 'lr = 5e-3\nscheduler = "constant"\nwarmup_steps = 1'),
     "train.warmup_steps: the 'constant' scheduler has no warm-up (transformers ignores num_warmup_steps for it), so 1 "
     "warm-up step(s) would not happen; use scheduler = 'constant_with_warmup', or leave warmup_steps out"),
    (llm().replace("lr = 5e-3", 'lr = 1e-8\nscheduler = "polynomial"'),
     "train.lr: the 'polynomial' scheduler decays to 1e-07 and needs a larger lr (transformers refuses it in every cell)"),
    (llm().replace('name = "pydoc"', 'name = "pydoc"\nnum_workers = 2'),
     "data.num_workers: causal_lm draws its training windows from the tokenized text in the cell's own process; no "
     "DataLoader workers would start (leave the key out)"),
    (llm().replace('name = "pydoc"', 'name = "pydoc"\ntrain = "train.txt"'),
     "data.train: data.kind = 'builtin' reads builtin:pydoc; this file would not be read"),
    (clip.suite(evaluation="batch_size = 64\nmax_windows = 4"),
     "eval.max_windows: caps the windows of a perplexity; only causal_lm suites have them (clip ranks every held-out "
     "image and caption)"),
    (clip.suite(data_extra='image_root = "images"'),
     "data.image_root: data.kind = 'builtin' reads builtin:shapes; this file would not be read"),
])
def test_a_setting_nothing_would_apply_is_refused_with_one_line(text, expected):
    assert expected in problems_of(text)


def test_gradient_checkpointing_runs_in_the_dense_arm_under_peft_kbit_preparation_too():
    """peft's prepare_model_for_kbit_training turns checkpointing on for k-bit bases only: the dense arm of a
    peft-kbit suite trained without it (other memory, other speed) under the same setting."""
    from transformers import AutoModelForCausalLM

    from qbench.cell import lora, models
    from qbench.contract import precisions

    suite = parse(llm(precisions='["fp32", "nf4"]').replace('baseline = "dense"', 'baseline = "fp32"').replace('lr = 5e-3', 'lr = 5e-3\nprepare = "peft-kbit"\ngradient_checkpointing = true'))
    path = models.resolve("builtin:tiny-llama")
    layers = {}
    for name in ("fp32", "nf4"):
        model = models.load_base(AutoModelForCausalLM, path, precisions.get(name), "float32", "cpu", suite.model)
        model = lora.attach(lora.prepare(model, suite), suite, "CAUSAL_LM", 0)
        layers[name] = lora.checkpointing_fields(model, suite)["train.gradient_checkpointing_layers"]
    assert layers["fp32"] == layers["nf4"] == 4  # the tiny Llama's four decoder layers, in both arms
    off = suite.model_copy(update={"train": suite.train.model_copy(update={"gradient_checkpointing": False})})
    plain = lora.attach(lora.prepare(models.load_base(AutoModelForCausalLM, path, precisions.get("fp32"), "float32",
                                                      "cpu", off.model), off), off, "CAUSAL_LM", 0)
    assert lora.checkpointing_fields(plain, off)["train.gradient_checkpointing_layers"] == 0


def test_a_revision_of_a_local_folder_is_refused(tmp_path):
    from qbench.contract.suite import load
    from qbench.runner.preflight import check_suite

    from .conftest import write_suite

    suite = write_suite(tmp_path, llm('revision = "v2"', '["dense"]'))
    with pytest.raises(SuiteError) as caught:
        check_suite(load(suite))
    assert any(p.startswith("model.revision: names a revision of a hub repository, and model.id is a local folder")
               for p in caught.value.problems)
