"""openai/clip-vit-base-patch32 at full size (random weights, written locally): every precision
through `qbench run`, and each cell's measured base bytes against a count made from the
configuration alone."""

from __future__ import annotations

import math

import pytest

from qbench import cli
from qbench.contract import precisions
from qbench.contract import records as results
from qbench.zoo.full_scale import CLIP_VIT_B32_CONFIG, write_random_clip

from .conftest import write_suite
from .helpers import clip

EVERY_PRECISION = ["bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"]
DENSE_BYTES = 2  # bfloat16: the compute dtype, and the storage of everything bitsandbytes leaves alone
INT64_BYTES = 8
FLOAT32_BYTES = 4
BLOCK = 64  # values per absmax block (bitsandbytes' default, the one transformers uses)
NESTED_BLOCK = 256  # absmax values per block of the second quantization


def clip_linears(config: dict) -> dict[str, list[tuple[int, int, bool]]]:
    """(out_features, in_features, has_bias) of every nn.Linear of a CLIPModel, from its configuration."""

    def encoder(hidden: int, intermediate: int, layers: int) -> list[tuple[int, int, bool]]:
        attention = [(hidden, hidden, True)] * 4  # q_proj, k_proj, v_proj, out_proj
        mlp = [(intermediate, hidden, True), (hidden, intermediate, True)]  # fc1, fc2
        return (attention + mlp) * layers

    vision, text, projection = config["vision_config"], config["text_config"], config["projection_dim"]
    return {
        "vision": encoder(vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]),
        "text": encoder(text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]),
        "visual_projection": [(projection, vision["hidden_size"], False)],
        "text_projection": [(projection, text["hidden_size"], False)],
    }


def other_params(config: dict) -> int:
    """Parameters outside the linears: embeddings, the patch convolution, layer norms, logit scale."""
    vision, text = config["vision_config"], config["text_config"]
    v, t = vision["hidden_size"], text["hidden_size"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    vision_params = (
        v  # class embedding
        + v * vision["num_channels"] * vision["patch_size"] ** 2  # patch convolution, no bias
        + (patches + 1) * v  # position embedding
        + 2 * 2 * v  # pre_layrnorm, post_layernorm (weight + bias)
        + vision["num_hidden_layers"] * 2 * 2 * v  # layer_norm1, layer_norm2
    )
    text_params = (
        text["vocab_size"] * t  # token embedding
        + text["max_position_embeddings"] * t  # position embedding
        + text["num_hidden_layers"] * 2 * 2 * t  # layer_norm1, layer_norm2
        + 2 * t  # final_layer_norm
    )
    return vision_params + text_params + 1  # logit_scale


def position_id_buffer_bytes(config: dict) -> int:
    vision, text = config["vision_config"], config["text_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return INT64_BYTES * (patches + 1 + text["max_position_embeddings"])


def quantized_linear_bytes(out_features: int, in_features: int, precision: precisions.Precision) -> int:
    """Codes plus quantization state of one bitsandbytes linear (its bias stays dense)."""
    values = out_features * in_features
    if precision.kind == "int8":
        return values + FLOAT32_BYTES * out_features  # one int8 per value, one float32 scale per row
    blocks = math.ceil(values / BLOCK)
    codes = math.ceil(values / 2)  # two 4-bit codes per byte
    code_table = 16 * FLOAT32_BYTES  # the FP4/NF4 values each layer's state keeps
    if not precision.double_quant:
        return codes + FLOAT32_BYTES * blocks + code_table
    nested = math.ceil(blocks / NESTED_BLOCK)
    # absmax quantized to 8 bits, with a float32 absmax per 256 of them, its 256-entry float32 code
    # table and a float32 offset
    return codes + blocks + FLOAT32_BYTES * nested + 256 * FLOAT32_BYTES + FLOAT32_BYTES + code_table


def predicted_base(config: dict, name: str) -> dict[str, int]:
    """Bytes and parameters of the loaded base in precision `name`, from the configuration alone.

    transformers' bitsandbytes integration quantizes every nn.Linear except the modules that
    `get_keys_to_not_convert` returns: tied and output embeddings (CLIP has none) and the module
    holding the *last* parameter of `model.named_parameters()`. CLIPModel's own `logit_scale` is
    listed first, so the last is `text_projection.weight`: text_projection stays dense, while
    visual_projection is quantized."""
    precision = precisions.get(name)
    linears = clip_linears(config)
    all_linears = [shape for group in linears.values() for shape in group]
    if precision.kind == "dense":
        quantized, dense_linears = [], all_linears
    else:
        quantized = linears["vision"] + linears["text"] + linears["visual_projection"]
        dense_linears = linears["text_projection"]
    bias_params = sum(out for out, _, has_bias in all_linears if has_bias)
    dense_weight_params = sum(out * inp for out, inp, _ in dense_linears)
    dense_params = other_params(config) + bias_params + dense_weight_params
    quantized_params = sum(out * inp for out, inp, _ in quantized)
    return {
        "base_bytes": sum(quantized_linear_bytes(o, i, precision) for o, i, _ in quantized)
        + DENSE_BYTES * dense_params
        + position_id_buffer_bytes(config),
        "quantized_params": quantized_params,
        "total_params": quantized_params + dense_params,
        "quantized_linears": len(quantized),
    }


def test_the_prediction_counts_the_published_parameter_count_of_clip_vit_b32():
    # 151,277,313: the parameter count of openai/clip-vit-base-patch32 as transformers loads it
    assert predicted_base(CLIP_VIT_B32_CONFIG, "bf16")["total_params"] == 151_277_313
    assert predicted_base(CLIP_VIT_B32_CONFIG, "nf4")["total_params"] == 151_277_313


@pytest.fixture(scope="module")
def full_scale_run(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("full-scale")
    checkpoint = write_random_clip(root / "clip-vit-b32-random")
    data = clip.images_tsv(root / "data", train_images=4, eval_images=2, size=48, user_format=True)
    suite = write_suite(
        root,
        clip.suite(
            checkpoint,
            data,
            None,
            name="clip-vit-b32-full-scale",
            steps=None,
            lora=clip.USER_LORA,
            evaluation=None,
            # one optimizer step of two pairs per cell: what is checked here is the loaded base
            train="steps = 1\nbatch_size = 2\ngrad_accum = 1\nlr = 1e-4\nweight_decay = 0.01\nscheduler = \"cosine\"\n"
            "warmup_steps = 0\nmax_length = 64\nuntimed_steps = 0",
            extra=f"[eval]\nbatch_size = 8\nbefore = false\n[matrix]\nprecisions = {EVERY_PRECISION}\n",
        ),
    )
    out = root / "out"
    assert cli.main(["run", str(suite), "--out", str(out), "--device", "cpu"]) == 0
    (run_dir,) = (out / "clip-vit-b32-full-scale").iterdir()
    return {r["precision"]: r for r in results.read_records(run_dir)}


@pytest.mark.slow
def test_every_precision_of_full_size_clip_vit_b32_runs_and_its_base_bytes_match_the_prediction(full_scale_run):
    records = full_scale_run
    assert sorted(records) == sorted(EVERY_PRECISION)
    rows = []
    for name in EVERY_PRECISION:
        record = records[name]
        assert record["status"] == "ok", (name, record.get("error"))
        predicted = predicted_base(CLIP_VIT_B32_CONFIG, name)
        measured = record["weights.load.base_bytes"]
        assert abs(measured - predicted["base_bytes"]) <= 0.01 * predicted["base_bytes"], (name, measured, predicted)
        assert record["weights.load.quantized_params"] == predicted["quantized_params"]
        assert record["weights.load.quantized_params"] + record["weights.load.unquantized_params"] == predicted["total_params"]
        linear_count = record["weights.load.linears.linear4bit_count"] + record["weights.load.linears.linear8bitlt_count"]
        assert linear_count == predicted["quantized_linears"]
        assert record["weights.load.linears.dense_linear_count"] == (1 if predicted["quantized_linears"] else 146)
        rows.append(
            (
                name,
                predicted["base_bytes"],
                measured,
                measured - predicted["base_bytes"],
                8 * measured / predicted["total_params"],
                record["weights.load.bits_per_quantized_param"],
                record["memory.all_phases.rss_peak_bytes"] / 2**20,
                record["time.load.wall_s"],
            )
        )
    # the ordering a user expects at full size (at toy size double quantization's tables outweigh its saving)
    sizes = {name: records[name]["weights.load.base_bytes"] for name in EVERY_PRECISION}
    assert sizes["nf4-dq"] < sizes["nf4"] < sizes["int8"] < sizes["bf16"]
    assert sizes["fp4-dq"] < sizes["fp4"] == sizes["nf4"]
    header = "| precision | predicted base bytes | measured base bytes | diff | bits/param (whole base) | bits/quantized param | peak RSS MiB | load s |"
    lines = [header, "|" + "---|" * 8]
    for name, want, got, diff, bits, qbits, rss, load in rows:
        qbits_text = f"{qbits:.3f}" if qbits is not None else "—"
        lines.append(f"| {name} | {want:,} | {got:,} | {diff:+,} | {bits:.3f} | {qbits_text} | {rss:,.0f} | {load:.1f} |")
    print("\nopenai/clip-vit-base-patch32 architecture, random weights, CPU\n" + "\n".join(lines))
