"""Every length of a suite is checked against the model's own limit before any cell, for both tasks, and the
limit is written into the record beside the evaluation protocol."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from qbench import cli
from qbench.cell import models
from qbench.contract.suite import load

from .conftest import write_suite
from .helpers import clip, executors, suites

TEXT = "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.\n" * 60


def lm_suite(model: str, train: str = "max_length = 32", evaluation: str = "", data: str | None = None) -> str:
    return suites.causal_lm(
        model, data, ("bf16",), steps=3, train=f"batch_size = 2\nlr = 1e-3\nuntimed_steps = 1\n{train}",
        lora='target_modules = ["q_proj", "v_proj"]', evaluation=f"batch_size = 4\n{evaluation}",
    )


def check(tmp_path: Path, text: str, capsys) -> tuple[int, list[str]]:
    """`qbench run SUITE` (a real run, not --check: nothing may start): exit code and stderr lines."""
    suite = write_suite(tmp_path, text)
    with pytest.MonkeyPatch.context() as patch:
        executors.use(patch, executors.NO_CELL)
        code = cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out").exists()  # refused before any cell: no run folder
    return code, capsys.readouterr().err.splitlines()


def test_a_clip_max_length_past_the_text_positions_stops_before_any_cell(tmp_path: Path, tiny_clip_dir: Path,
                                                                       tsv_data_dir: Path, capsys):
    text = clip.suite(tiny_clip_dir, tsv_data_dir).replace("max_length = 16", "max_length = 64")
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    assert lines == [
        f"error: {tmp_path / 'suite.toml'}: train.max_length: 64 tokens, but model '{tiny_clip_dir}' takes at most 16 (its "
        "text tower's positions: config.text_config.max_position_embeddings); a longer caption cannot be encoded. Set "
        "train.max_length to at most 16"
    ]


def test_a_window_or_training_length_past_the_llm_context_stops_before_any_cell(tmp_path: Path, capsys):
    code, lines = check(tmp_path, lm_suite("builtin:tiny-llama", "max_length = 512", "window = 512"), capsys)
    assert code == 2
    assert [line.split(": ")[2] for line in lines] == ["train.max_length", "eval.window"]
    assert all("model 'builtin:tiny-llama' takes at most 128 (its context: config.max_position_embeddings)" in line for line in lines)
    assert "its perplexity is another quantity. Set eval.window to at most 128" in lines[1]


def test_the_longest_lengths_the_model_takes_pass(tmp_path: Path, capsys):
    suite = write_suite(tmp_path, lm_suite("builtin:tiny-llama", "max_length = 128", "window = 128"))
    assert cli.main(["run", str(suite), "--check", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert "passes every check" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # --check writes nothing


@pytest.fixture(scope="module")
def limitless_lm(tmp_path_factory) -> Path:
    """A causal LM folder whose config (Mamba) and tokenizer state no context length."""
    from transformers import MambaConfig

    folder = tmp_path_factory.mktemp("mamba")
    MambaConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, state_size=4).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(models.resolve("builtin:tiny-llama")) / name, folder / name)
    return folder


def test_a_model_that_states_no_context_needs_an_explicit_window(tmp_path: Path, limitless_lm: Path, capsys):
    text = lm_suite(str(limitless_lm)).replace('["q_proj", "v_proj"]', '["in_proj"]')
    code, lines = check(tmp_path, text, capsys)
    assert code == 2 and len(lines) == 1
    assert "eval.window: model" in lines[0] and "states no context length (neither the config" in lines[0]
    assert "set eval.window" in lines[0]
    suite = write_suite(tmp_path, text.replace("[eval]\n", "[eval]\nwindow = 64\n"), "windowed.toml")
    assert cli.main(["run", str(suite), "--check", "--device", "cpu"]) == 0


def test_the_context_is_read_from_whichever_attribute_the_config_uses():
    from qbench.contract.lengths import causal_lm_limit, clip_limit

    assert causal_lm_limit(SimpleNamespace(n_positions=1024)).tokens == 1024
    assert causal_lm_limit(SimpleNamespace(max_seq_len=2048)).source == "config.max_seq_len"
    assert causal_lm_limit(SimpleNamespace(seq_length=4096, n_ctx=8)).tokens == 4096
    unset = int(1e30)  # transformers' "no limit" for a tokenizer
    assert causal_lm_limit(SimpleNamespace(), unset).tokens is None
    assert causal_lm_limit(SimpleNamespace(max_position_embeddings=None), 512).source == "tokenizer.model_max_length"
    assert causal_lm_limit(SimpleNamespace(max_position_embeddings=True)).tokens is None
    assert clip_limit(SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=77))).tokens == 77
    assert clip_limit(SimpleNamespace()).tokens is None


def test_the_llm_record_holds_the_context_beside_the_window(tmp_path: Path, tiny_llama_path: str):
    from qbench.cell.tasks.causal_lm import CausalLMTask

    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "eval.txt").write_text(TEXT[:500], encoding="utf-8")
    data = 'kind = "text"\ntrain = "train.txt"\neval = "eval.txt"'
    loaded = load(write_suite(tmp_path, lm_suite("builtin:tiny-llama", data=data)))
    info = CausalLMTask(loaded, tiny_llama_path, "cpu").prepare_data()
    assert info["model.max_positions"] == 128 and info["model.max_positions_source"] == "config.max_position_embeddings"
    assert info["eval.window_tokens"] == 128 and info["eval.window_source"] == "config.max_position_embeddings"
    assert info["config.train.max_length"] == 32 and info["train.max_length_source"] == "train.max_length"
    # a cell started without the checks refuses the length too, rather than giving another perplexity
    wide = load(write_suite(tmp_path, lm_suite("builtin:tiny-llama", data=data, evaluation="window = 256"), "wide.toml"))
    with pytest.raises(ValueError, match="eval.window: 256 tokens, but model 'builtin:tiny-llama' takes at most 128"):
        CausalLMTask(wide, tiny_llama_path, "cpu").prepare_data()


def test_the_clip_record_holds_the_text_positions_and_counts_truncated_captions(tmp_path: Path, tiny_clip_dir: Path,
                                                                               tsv_data_dir: Path):
    from qbench.cell.tasks.clip import ClipTask

    data = tmp_path / "data"
    shutil.copytree(tsv_data_dir, data)
    lines = (data / "train.tsv").read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].split("\t")[0] + "\t" + " ".join(["a red square on white"] * 4)  # 20 words + BOS/EOS
    (data / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = load(write_suite(tmp_path, clip.suite(tiny_clip_dir, data)))
    info = ClipTask(loaded, str(tiny_clip_dir), "cpu").prepare_data()
    assert info["model.max_positions"] == 16 and info["eval.text_max_length_tokens"] == 16
    assert info["data.train_captions_truncated"] == 1 and info["data.eval_captions_truncated"] == 0
    json.dumps(info)  # record fields are plain JSON values


def test_without_max_length_a_clip_suite_takes_the_model_positions_when_fewer_than_64(tmp_path: Path, tiny_clip_dir: Path,
                                                                                    tsv_data_dir: Path, capsys):
    from qbench.cell.tasks.clip import ClipTask

    text = clip.suite(tiny_clip_dir, tsv_data_dir).replace("max_length = 16\n", "")
    suite = write_suite(tmp_path, text)
    assert cli.main(["run", str(suite), "--check", "--device", "cpu"]) == 0
    loaded = load(suite)
    assert loaded.suite.train.max_length is None
    info = ClipTask(loaded, str(tiny_clip_dir), "cpu").prepare_data()
    assert info["config.train.max_length"] == 16 == info["eval.text_max_length_tokens"]
    assert info["train.max_length_source"] == (
        "default: the model's limit of 16 (its text tower's positions: config.text_config.max_position_embeddings)"
    )
