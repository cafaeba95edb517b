"""The committed tiny-Llama checkpoint and the script that builds it."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from qbench.cell.data.text import builtin_corpus, pretrain_text
from qbench.zoo import llama

from .helpers import load_script

CHECKPOINT = llama.DEFAULT_OUT_DIR
perplexity = load_script("check_llm_finetune").perplexity
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The model is tiny; on a shared CPU a second OpenMP thread mostly waits and slows it down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM.from_pretrained(CHECKPOINT).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


def test_checkpoint_folder_holds_a_small_float32_safetensors_model():
    names = {path.name for path in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 8 * 2**20
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_checkpoint_loads_with_llama_module_names(model):
    assert isinstance(model, LlamaForCausalLM)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    for index, layer in enumerate(model.model.layers):
        for name in LLAMA_LINEARS:
            module = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            linear = getattr(module, name)
            assert isinstance(linear, torch.nn.Linear), f"layer {index} {name}"


def test_every_linear_dimension_is_a_multiple_of_the_bnb_block(model):
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers + 1  # + lm_head
    for linear in linears:
        assert linear.in_features % 64 == 0 and linear.out_features % 64 == 0


def test_embeddings_are_tied(model):
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_round_trips_held_out_text(tokenizer):
    text = builtin_corpus().eval[:5000] + "\nünïcödé → ✓ and\ttabs\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(text) / len(ids) > 2.0  # BPE merges learned, not bytes


def test_tokenizer_special_tokens_and_no_automatic_ones(tokenizer, model):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert model.config.bos_token_id == 0 and model.config.eos_token_id == 1 and model.config.pad_token_id == 2
    assert len(tokenizer) == model.config.vocab_size
    ids = tokenizer("def f(): pass")["input_ids"]
    assert not set(ids) & {0, 1, 2}


def test_model_was_pretrained_held_out_perplexity_is_far_below_uniform(model, tokenizer):
    ids = torch.tensor(tokenizer(builtin_corpus().eval[:8000])["input_ids"])
    value = perplexity(model, ids, model.config.max_position_embeddings)
    assert value < 120, value  # 75 when built; uniform over the vocabulary would be 1024
    assert math.isfinite(value)


def test_perplexity_scores_every_token_after_the_first_once():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            self.seen.append(input_ids.shape)
            return type("Output", (), {"logits": torch.zeros(*input_ids.shape, 10)})()

    model = Uniform()
    model.seen = []
    assert perplexity(model, torch.arange(10) % 10, context_length=4, batch_size=8) == pytest.approx(10.0)
    # 9 scored tokens: windows of 4, 4 and a tail of 1.
    assert sorted(shape[1] for shape in model.seen for _ in range(shape[0])) == [1, 4, 4]


def test_build_is_reproducible_for_a_seed(tmp_path):
    shape = llama.ModelShape(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        context_length=32,
    )
    settings = llama.PretrainSettings(steps=2, batch_size=2, warmup_steps=1)
    for name in ("a", "b"):
        llama.build(tmp_path / name, seed=3, shape=shape, settings=settings)
    for file in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.config.num_hidden_layers == 1
    assert loaded.config.qbench["seed"] == 3


def test_shape_rejects_sizes_off_the_bnb_block():
    with pytest.raises(ValueError, match="hidden_size=100 must be a multiple of 64"):
        llama.ModelShape(hidden_size=100)


def test_tokenizer_is_trained_on_the_pretrain_text_only(tokenizer):
    # The committed tokenizer and a fresh one trained on the pretrain part agree.
    fresh = llama.train_tokenizer(pretrain_text(), vocab_size=len(tokenizer))
    assert fresh.get_vocab() == tokenizer.get_vocab()
