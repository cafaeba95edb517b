"""The byte split of a loaded base (codes, each kind of quantization state, each kind of unquantized
tensor) and the weight error against the checkpoint, on a throwaway tiny CLIP."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qbench.cell import models
from qbench.cell.measure import weight_error, weights
from qbench.contract import precisions

from .helpers import clip

SPEC = SimpleNamespace(revision=None, device_map="single", safetensors_only=True, trust_remote_code=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(clip.checkpoint(tmp_path_factory.mktemp("tiny-clip"), hidden=64, heads=4, image_size=32, patch_size=8))


def load(path: str, name: str):
    from transformers import CLIPModel

    return models.load_base(CLIPModel, path, precisions.get(name), "bfloat16", "cpu", SPEC)


def quantized_shapes(model) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for m in model.modules() if weights.is_bnb_linear(m)]


@pytest.mark.parametrize("name", ["int8", "fp4", "nf4", "nf4-dq"])
def test_quantization_state_is_split_by_kind_to_the_byte(checkpoint, name):
    model = load(checkpoint, name)
    account = weights.account_base(model)
    shapes = quantized_shapes(model)
    blocks = [math.ceil(o * i / 64) for o, i in shapes]
    if name == "int8":
        expected = {"row_scale": sum(4 * o for o, _ in shapes)}
    elif name.endswith("-dq"):
        expected = {
            "absmax": sum(blocks),  # one uint8 per 64 weights
            "nested_absmax": sum(4 * math.ceil(b / 256) for b in blocks),  # one float32 per 256 blocks
            "code_table": 64 * len(shapes),  # 16 float32 values per layer
            "nested_code_table": 1024 * len(shapes),  # 256 float32 values per layer
            "offset": 4 * len(shapes),
        }
    else:
        expected = {"absmax": sum(4 * b for b in blocks), "code_table": 64 * len(shapes)}
    for kind in weights.STATE_KINDS:
        assert account[f"weights.load.quant_state.{kind}_bytes"] == expected.get(kind, 0), kind
    assert account["weights.load.quant_state_bytes"] == sum(expected.values())
    codes_per_weight = 1 if name == "int8" else 0.5
    assert account["weights.load.quantized_codes_bytes"] == sum(o * i * codes_per_weight for o, i in shapes)
    assert account["weights.load.bits_per_quantized_param"] == pytest.approx(
        8 * (account["weights.load.quantized_codes_bytes"] + account["weights.load.quant_state_bytes"]) / sum(o * i for o, i in shapes)
    )


def test_the_unquantized_part_is_split_by_module_kind_and_adds_up(checkpoint):
    dense = load(checkpoint, "bf16")
    model = load(checkpoint, "nf4")
    account = weights.account_base(model)
    parts = {kind: account[f"weights.load.unquantized.{kind}_bytes"] for kind in weights.UNQUANTIZED_KINDS}
    assert sum(parts.values()) == account["weights.load.unquantized_bytes"]
    assert account["weights.load.base_bytes"] == (
        account["weights.load.quantized_codes_bytes"] + account["weights.load.quant_state_bytes"] + account["weights.load.unquantized_bytes"]
    )
    by_name = dict(dense.named_parameters())
    # embeddings (token, position, class) and the patch convolution, found here by name in the dense model
    assert parts["embedding"] + parts["conv"] == sum(p.nbytes for n, p in by_name.items() if "embedding" in n)
    assert parts["norm"] == sum(p.nbytes for n, p in by_name.items() if "layer_norm" in n or "layrnorm" in n or "layernorm" in n)
    # text_projection is kept dense by transformers; the quantized linears keep their biases in bf16
    assert parts["dense_linear"] == by_name["text_projection.weight"].nbytes
    assert parts["quantized_linear_bias"] == sum(
        m.bias.nbytes for m in model.modules() if weights.is_bnb_linear(m) and m.bias is not None
    )
    assert parts["buffer"] == sum(b.nbytes for b in dense.buffers())
    assert account["weights.load.params"] == sum(p.numel() for p in dense.parameters())
    assert account["weights.load.unquantized_share_of_bytes"] == pytest.approx(account["weights.load.unquantized_bytes"] / account["weights.load.base_bytes"])


def test_a_dense_base_has_no_quantized_part_and_16_bits_per_param(checkpoint):
    account = weights.account_base(load(checkpoint, "bf16"))
    assert account["weights.load.quantized_params"] == 0
    assert account["weights.load.bits_per_quantized_param"] is None
    assert account["weights.load.bits_per_param"] == pytest.approx(16.0)


def test_format_readback_of_int8_names_the_threshold(checkpoint):
    found = weights.read_format(load(checkpoint, "int8"))
    assert found["weights.load.linears.linear8bitlt_count"] > 0 and found["weights.load.linears.linear4bit_count"] == 0
    assert found["weights.load.linears.int8_thresholds"] == "6.0"


def test_a_dense_arm_stored_in_the_wrong_dtype_fails_naming_the_modules(checkpoint):
    with pytest.raises(weights.FormatMismatch, match=r"q_proj stores torch.bfloat16, expected torch.float32"):
        weights.check_format(load(checkpoint, "bf16"), precisions.get("fp32"))


# ---- weight error against the checkpoint ----

def test_an_fp32_base_is_exactly_the_checkpoint(checkpoint):
    from transformers import CLIPModel

    model = models.load_base(CLIPModel, checkpoint, precisions.get("fp32"), "float32", "cpu", SPEC)
    error = weight_error.measure(model, checkpoint)
    assert error["weights.load.error.layers"] == sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert error["weights.load.error.rel_max"] == 0.0 and error["weights.load.error.rel_mean"] == 0.0


def test_a_layer_scaled_by_1_1_shows_a_relative_error_of_0_1(checkpoint):
    from transformers import CLIPModel

    model = models.load_base(CLIPModel, checkpoint, precisions.get("fp32"), "float32", "cpu", SPEC)
    layer = model.text_model.encoder.layers[1].mlp.fc2
    with torch.no_grad():
        layer.weight.mul_(1.1)
    error = weight_error.measure(model, checkpoint)
    assert error["weights.load.error.rel_max"] == pytest.approx(0.1, rel=1e-5)
    assert error["weights.load.error.rel_max_layer"] == "text_model.encoder.layers.1.mlp.fc2"
    assert error["weights.load.error.rel_mean"] == pytest.approx(0.1 / error["weights.load.error.layers"], rel=1e-5)


def test_weight_error_grows_from_bf16_to_int8_to_nf4_to_fp4(checkpoint):
    errors = {name: weight_error.measure(load(checkpoint, name), checkpoint) for name in ("bf16", "int8", "nf4", "fp4")}
    mean = {name: e["weights.load.error.rel_mean"] for name, e in errors.items()}
    assert 0 < mean["bf16"] < 0.004  # bf16 keeps 8 significant bits: at most 2^-9 per value
    assert mean["bf16"] < mean["int8"] < mean["nf4"] < mean["fp4"] < 0.3
    assert errors["nf4"]["weights.load.error.scope"] == "quantized linears"
    assert errors["bf16"]["weights.load.error.scope"] == "all linears (dense base)"
    for e in errors.values():
        assert e["weights.load.error.rel_max"] >= e["weights.load.error.rel_mean"]
        assert e["weights.load.error.layers_not_in_checkpoint"] == 0


def test_a_sharded_checkpoint_is_read_tensor_by_tensor(checkpoint, tmp_path):
    from transformers import CLIPModel

    CLIPModel.from_pretrained(checkpoint).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(weight_error.safetensors_files(str(tmp_path))) > 1
    model = load(checkpoint, "nf4")
    assert weight_error.measure(model, str(tmp_path)) == weight_error.measure(model, checkpoint)


def test_without_safetensors_the_error_is_unavailable_with_the_reason(checkpoint, tmp_path):
    result = weight_error.measure(load(checkpoint, "nf4"), str(tmp_path))
    assert "no *.safetensors files" in result["weights.load.error.unavailable_reason"]
    assert "weights.load.error.rel_mean" not in result


def test_a_tied_head_is_counted_once_in_bytes_and_in_parameters():
    embedding = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = embedding.weight
    account = weights.account_base(torch.nn.ModuleDict({"embed": embedding, "head": head}).to(torch.bfloat16))
    assert account["weights.load.params"] == 1600
    assert account["weights.load.base_bytes"] == 3200
    assert account["weights.load.bits_per_param"] == 16.0
