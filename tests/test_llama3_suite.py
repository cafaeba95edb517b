"""The user's Llama-3-8B suite, run through the same code path on a local scaled-down Llama folder."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract import records as results
from qbench.contract.suite import load

from .conftest import SUITES
from .helpers.schema import assert_schema_3_run


def scaled_down_llama3(folder: Path, tokenizer_from: str) -> Path:
    """A Llama-architecture checkpoint with Llama-3's module names and features (GQA, rope theta), tiny sizes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tokenizer_from) / name).exists():
            shutil.copy(Path(tokenizer_from) / name, folder / name)
    return folder


def test_llama3_suite_keeps_the_users_settings():
    suite = load(SUITES / "llama3-8b.toml").suite
    assert suite.task == "causal_lm" and suite.compute_dtype == "bfloat16"
    assert (suite.lora.r, suite.lora.alpha, suite.lora.dropout, suite.lora.bias) == (8, 16, 0.05, "none")
    assert suite.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert "nf4-dq" in suite.matrix.precisions
    from qbench.cell.models import quantization_config
    from qbench.contract import precisions

    config = quantization_config(precisions.get("nf4-dq"), suite.compute_dtype)
    assert config.load_in_4bit and config.bnb_4bit_use_double_quant and config.bnb_4bit_quant_type == "nf4"


@pytest.mark.slow
def test_llama3_suite_runs_on_a_local_llama_folder_with_text_files(tmp_path: Path, tiny_llama_path):
    model = scaled_down_llama3(tmp_path / "llama3-mini", tiny_llama_path)
    from pydoc_data.topics import topics

    (tmp_path / "train.txt").write_text(topics["assert"] + topics["class"], encoding="utf-8")
    with open(tmp_path / "eval.jsonl", "w", encoding="utf-8") as handle:
        for key in ("for", "while"):
            handle.write(json.dumps({"text": topics[key]}) + "\n")
    text = (SUITES / "llama3-8b.toml").read_text()
    text = text.replace('id = "meta-llama/Meta-Llama-3-8B"', f'id = "{model}"')
    text = text.replace('kind = "builtin"\nname = "pydoc"', 'kind = "text"\ntrain = "train.txt"\neval = "eval.jsonl"')
    for key, value in {"steps": 3, "batch_size": 2, "grad_accum": 2, "max_length": 32, "untimed_steps": 1,
                       "warmup_steps": 1, "window": 64}.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    suite = tmp_path / "llama3-local.toml"
    suite.write_text(text)

    code = cli.main(["run", str(suite), "--only", "bf16,nf4-dq", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    (run_dir,) = (tmp_path / "out" / "llama3-8b").iterdir()
    assert len(assert_schema_3_run(run_dir)) == 2  # a trained causal LM's records validate as they are
    records = {r["precision"]: r for r in results.read_records(run_dir)}
    nf4 = records["nf4-dq"]
    assert nf4["status"] == "ok", nf4.get("error")
    assert nf4["weights.load.linears.linear4bit_count"] == 2 * 7  # q,k,v,o,gate,up,down per layer; lm_head stays dense
    assert nf4["weights.load.linears.quant_types"] == "nf4" and nf4["weights.load.linears.compressed_statistics"] == "true"
    assert nf4["params.lora_modules"] == 2 * 4
    assert nf4["eval.window_tokens"] == 64 and nf4["eval.scored_tokens"] > 0
    assert nf4["data.source"].startswith("text files")
    for record in records.values():
        for when in ("eval_before", "eval_after"):
            assert math.isfinite(record[f"quality.{when}.perplexity"]) and record[f"quality.{when}.perplexity"] > 1
            assert record[f"quality.{when}.bits_per_byte"] > 0
    assert records["bf16"]["eval.scored_tokens"] == nf4["eval.scored_tokens"]
    assert nf4["weights.load.base_bytes"] < records["bf16"]["weights.load.base_bytes"]
