"""The builtin tiny CLIP checkpoint: loads like a hub model, pools at EOS, is actually trained."""

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from qbench.cell.data import shapes
from qbench.zoo import clip as zoo_clip

CHECKPOINT = zoo_clip.DEFAULT_OUT_DIR


@pytest.fixture(scope="module")
def model():
    return CLIPModel.from_pretrained(CHECKPOINT).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def image_processor():
    return AutoImageProcessor.from_pretrained(CHECKPOINT)


def _text_embeds(model, input_ids):
    with torch.no_grad():
        out = model.get_text_features(input_ids=input_ids)
    return getattr(out, "pooler_output", out)


def _image_embeds(model, pixel_values):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values)
    return getattr(out, "pooler_output", out)


def test_checkpoint_is_a_small_safetensors_folder():
    names = {path.name for path in CHECKPOINT.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    } <= names
    total_bytes = sum(path.stat().st_size for path in CHECKPOINT.iterdir())
    assert total_bytes < 4 * 2**20


def test_tokenizer_special_ids_match_the_text_config_and_eos_is_not_2(model, tokenizer):
    text_config = model.config.text_config
    # eos_token_id == 2 switches CLIP's text pooling to the legacy "largest token id" rule
    assert tokenizer.eos_token_id != 2
    assert tokenizer.eos_token_id == text_config.eos_token_id
    assert tokenizer.bos_token_id == text_config.bos_token_id
    assert tokenizer.pad_token_id == text_config.pad_token_id
    assert len(tokenizer) == text_config.vocab_size
    assert tokenizer.model_max_length == text_config.max_position_embeddings


def test_fresh_tokenizer_also_keeps_eos_off_id_2():
    tokenizer = zoo_clip.make_tokenizer(shapes.vocabulary())
    assert tokenizer.eos_token_id not in (None, 2)


def test_tokenizer_wraps_captions_in_bos_eos_and_knows_every_word(tokenizer):
    caption = "a red circle on a blue background"
    ids = tokenizer(caption)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(caption.split()) + 2
    assert tokenizer.unk_token_id not in tokenizer(" ".join(shapes.vocabulary()))["input_ids"]


def test_padded_batch_ends_each_caption_with_eos_then_pad(tokenizer):
    batch = tokenizer(["a red circle", "a photo of a green square"], padding=True, return_tensors="pt")
    short = batch["input_ids"][0].tolist()
    assert short[4] == tokenizer.eos_token_id
    assert set(short[5:]) == {tokenizer.pad_token_id}
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * (len(short) - 5)


def test_image_processor_gives_the_models_image_size(model, image_processor):
    split = shapes.make_split("shifted-eval")
    pixels = image_processor(images=split.images[:2], return_tensors="pt")["pixel_values"]
    size = model.config.vision_config.image_size
    assert tuple(pixels.shape) == (2, 3, size, size)


def test_text_embedding_pools_at_eos_not_after_it(model, tokenizer):
    ids = tokenizer(["a red circle"], padding="max_length", return_tensors="pt")["input_ids"]
    eos_at = ids[0].tolist().index(tokenizer.eos_token_id)
    after_eos = ids.clone()
    after_eos[0, eos_at + 1 :] = tokenizer.convert_tokens_to_ids("triangle")
    other_word = ids.clone()
    other_word[0, eos_at - 1] = tokenizer.convert_tokens_to_ids("triangle")
    base, padded, changed = (_text_embeds(model, x) for x in (ids, after_eos, other_word))
    torch.testing.assert_close(padded, base)
    assert (changed - base).norm() > 0.1 * base.norm()


def test_base_model_knows_colour_and_shape_of_pretrain_style_images(model, tokenizer, image_processor):
    split = shapes.make_split("shifted-eval", seed=5)  # fresh images; backgrounds don't matter
    classes = [(colour, shape) for colour in shapes.COLOURS for shape in shapes.SHAPES]
    prompts = tokenizer([f"a {c} {s}" for c, s in classes], padding=True, return_tensors="pt")
    pixels = image_processor(images=split.images, return_tensors="pt")["pixel_values"]
    image_embeds = _image_embeds(model, pixels)
    text_embeds = _text_embeds(model, prompts["input_ids"])
    predicted = (image_embeds @ text_embeds.T).argmax(dim=1).tolist()
    truth = [shapes.content_key(caption)[:2] for caption in split.captions]
    accuracy = sum(classes[p] == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy > 0.75  # chance is 1/40


def test_base_model_is_blind_to_backgrounds_so_lora_has_room_to_learn(model, tokenizer, image_processor):
    split = shapes.make_split("shifted-eval", seed=0)
    pixels = image_processor(images=split.images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(split.captions, padding=True, return_tensors="pt")["input_ids"]
    similarity = _image_embeds(model, pixels) @ _text_embeds(model, ids).T
    truth = torch.tensor(split.caption_image)
    image_to_text_r1 = (truth[similarity.argmax(dim=1)] == torch.arange(len(split.images))).float().mean().item()
    text_to_image_r1 = (similarity.argmax(dim=0) == truth).float().mean().item()
    mean_r1 = (image_to_text_r1 + text_to_image_r1) / 2
    # knows colour and shape (chance is 1/160), not which of ~4 backgrounds
    assert 0.10 < mean_r1 < 0.45


def test_the_build_trains_with_one_thread_and_gives_the_callers_back(monkeypatch, tmp_path):
    seen = {}

    def fake_build(out_dir, seed):
        seen.update(threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled())

    monkeypatch.setattr(zoo_clip, "_build", fake_build)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        zoo_clip.build(tmp_path)
        # one thread whatever the machine has: the committed checkpoint was built so, byte for byte
        assert seen == {"threads": 1, "deterministic": True}
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before)
