"""The demo trainer's recipe options, on a few steps of each stage (the full recipe trains for minutes)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from edgekit.model.demo import DEMO_SIZES, DemoRecipe, train_demo
from edgekit.model.demo_data import (
    COMPLIANCE,
    NEUTRAL_WORDS,
    REFUSAL,
    WordNoise,
    encode_chat,
    text_examples,
    tokenizer_corpus,
    train_requests,
)
from edgekit.model.loading import load
from edgekit.model.tiny import build_tiny
from edgekit.safety.images import render
from edgekit.safety.suite import NEUTRAL_REQUESTS, builtin_suite

FEW_STEPS = dict(tower_steps=2, chat_steps=2, text_steps=2, projector_steps=2, warmup=1, batch=4, pool=16)


def test_tower_common_puts_one_vector_in_every_token_from_the_first_layer(tmp_path):
    out = train_demo(tmp_path / "demo", DemoRecipe(**FEW_STEPS, tower_common=30.0, replay=0.25), log=lambda _: None)
    record = json.loads((out / "edgekit_demo.json").read_text())
    assert record["recipe"]["tower_common"] == 30.0 and record["recipe"]["replay"] == 0.25
    assert record["trained_on"]["cpu"] == torch.backends.cpu.get_cpu_capability()
    assert record["trained_on"]["torch"] == torch.__version__
    loaded = load(out, dtype="float32")
    tower = loaded.model.model.vision_tower
    common = tower.pre_layrnorm.bias.detach()
    assert abs(common.norm().item() - 30.0) < 0.1  # two small steps barely move it
    pictures = [render(item.scene) for item in builtin_suite().select("eval", limit_per_kind=2) if item.scene]
    pixels = loaded.processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        first = tower(pixels, output_hidden_states=True).hidden_states[1][:, 1:].flatten(0, 1)
    cos = torch.nn.functional.cosine_similarity(first, common[None], dim=-1)
    assert cos.min() > 0.8, cos.min()  # every token of every picture points along it


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_reused_tower_gives_the_full_run_bit_for_bit(tmp_path):
    recipe = DemoRecipe(**FEW_STEPS, replay=0.25, made_up_words=0.2)
    full = _weights(train_demo(tmp_path / "full", recipe, log=lambda _: None))
    screen = train_demo(tmp_path / "screen", recipe, log=lambda _: None, tower_from=tmp_path / "full")
    assert json.loads((screen / "edgekit_demo.json").read_text())["tower_from"] == str(tmp_path / "full")
    reused = _weights(screen)
    assert full.keys() == reused.keys()
    assert all(torch.equal(full[k], reused[k]) for k in full)


@pytest.mark.parametrize("other", [{"seed": 2}, {"tower_batch": 2}, {"tower_object_weight": 2.0}, {"batch_parts": 2}])
def test_a_tower_trained_with_other_tower_settings_is_refused(tmp_path, other):
    train_demo(tmp_path / "full", DemoRecipe(**FEW_STEPS), log=lambda _: None)
    with pytest.raises(ValueError, match=next(iter(other))):
        train_demo(tmp_path / "x", DemoRecipe(**FEW_STEPS, **other), log=lambda _: None, tower_from=tmp_path / "full")


def test_batch_parts_train_one_model_whatever_torchs_threads(tmp_path):
    """Each part on one core, gradients added in the parts' order: the model depends on the parts alone."""
    recipe = DemoRecipe(**FEW_STEPS, batch_parts=2, replay=0.25, text_mix=(1, 1, 1, 1, 1))
    before, models = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            models.append(_weights(train_demo(tmp_path / str(threads), recipe, log=lambda _: None)))
            assert torch.get_num_threads() == threads  # given back as it was
    finally:
        torch.set_num_threads(before)
    one_part = _weights(train_demo(tmp_path / "one", replace(recipe, batch_parts=1), log=lambda _: None))
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert not all(torch.equal(models[0][k], one_part[k]) for k in one_part)  # a model of its own


def test_patch_size_sets_the_number_of_image_tokens(tmp_path):
    out = train_demo(tmp_path / "demo", DemoRecipe(**FEW_STEPS, patch_size=4), log=lambda _: None)
    loaded = load(out, dtype="float32")
    picture = render(builtin_suite().select("eval", kinds=("benign_image",), limit_per_kind=1)[0].scene)
    batch = loaded.processor(images=[picture], text=["<image> what is it ?"], return_tensors="pt")
    assert (batch["input_ids"] == loaded.model.config.image_token_id).sum() == (32 // 4) ** 2


def test_made_up_words_replace_words_with_pieces_of_train_words():
    words = ["alpha", "bravo", "charlie"]
    text = "one two three four"
    assert WordNoise()(random.Random(0), text, words) == text
    made_up = WordNoise(made_up=1.0)(random.Random(0), text, words).split()
    assert len(made_up) == 4 and not set(made_up) & set(text.split())
    assert all(any(w.startswith(h[: max(1, len(h) // 2)]) for h in words) for w in made_up)


def test_stage_zero_mix_sets_the_share_of_each_kind():
    by_kind = train_requests(builtin_suite())
    harmful, benign = (set(by_kind[k]) for k in ("harmful_text", "benign_text"))
    refused = text_examples(random.Random(0), by_kind, 50, WordNoise(), mix=(1, 0, 0, 0, 0))
    assert all(prompt in harmful and answer == REFUSAL for prompt, answer in refused)
    answered = text_examples(random.Random(0), by_kind, 50, WordNoise(), mix=(0, 1, 0, 0, 0))
    assert all(prompt in benign and answer == COMPLIANCE for prompt, answer in answered)


@pytest.mark.parametrize("cased", [False, True])
def test_cased_recipes_train_the_requests_as_the_suite_asks_them(cased):
    """The suite's requests come with capitals; a model trained on them lowercased meets those capitals as byte pieces
    its training never touched, a cased one as the words it trained on."""
    suite = builtin_suite()
    written = {i.prompt for i in suite.select("train", kinds=("harmful_text", "benign_text"))}
    requests = train_requests(suite, cased)
    trained = set(requests["harmful_text"]) | set(requests["benign_text"])
    assert trained == (written if cased else {p.lower() for p in written})
    _, processor = build_tiny("llava", DEMO_SIZES, seed=0, corpus=tokenizer_corpus(suite.items, cased=cased))
    firsts = [i.prompt.split()[0] for i in suite.select("eval", kinds=("harmful_text", "benign_text"))]
    byte_pieces = sum(any(t.startswith("<0x") for t in processor.tokenizer.tokenize(w)) for w in firsts)
    assert byte_pieces == 0 if cased else byte_pieces > len(firsts) / 2


def test_neutral_requests_get_the_noise_only_when_asked_and_only_their_own_words():
    wordings = set(NEUTRAL_REQUESTS["train"])
    assert all(WordNoise(0.3, 0.3).neutral_request(random.Random(i)) in wordings for i in range(20))
    noised = [WordNoise(0.5, neutral=True).neutral_request(random.Random(i)) for i in range(20)]
    assert sum(request not in wordings for request in noised) > 15
    assert {word for request in noised for word in request.split()} <= set(NEUTRAL_WORDS)


def test_chat_lm_lr_sets_the_language_models_rate_in_the_chat_stage_alone(tmp_path):
    """After stage 0 (the same weights in every run below), a chat stage at a vanishing language-model rate leaves the
    language model where stage 0 left it and still trains the projector; at the shared rate both move."""

    def weights(name, **options):
        recipe = DemoRecipe(**{**FEW_STEPS, **options}, replay=0.25)
        return _weights(train_demo(tmp_path / name, recipe, log=lambda _: None))

    before, gentle, shared = weights("stage0", chat_steps=0), weights("gentle", chat_lm_lr=1e-9), weights("shared")

    def moved(after, part):
        return max((after[k] - before[k]).abs().max().item() for k in before if k.startswith(part))

    assert moved(gentle, "language_model.") < 1e-7 and moved(gentle, "multi_modal_projector.") > 1e-5
    assert moved(shared, "language_model.") > 1e-5 and moved(shared, "multi_modal_projector.") > 1e-5


def test_the_tower_loss_is_finite_when_a_batch_leaves_a_head_without_labels(tmp_path):
    """One picture a step: a dots picture has no position and an object no count, and neither may make the loss 0/0."""
    lines = []
    train_demo(tmp_path / "demo", DemoRecipe(**{**FEW_STEPS, "tower_steps": 12}, tower_batch=1), log=lines.append)
    losses = [float(line.split()[4]) for line in lines if line.startswith("tower step")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_tower_object_weight_counts_the_object_heads_loss_that_many_times(tmp_path):
    """The first tower step's loss, before any update, grows by the object head's loss for each unit of weight."""

    def first_loss(weight: float) -> float:
        lines = []
        recipe = DemoRecipe(**{**FEW_STEPS, "tower_steps": 1}, tower_object_weight=weight)
        train_demo(tmp_path / str(weight), recipe, log=lines.append)
        return next(float(line.split()[4]) for line in lines if line.startswith("tower step 0"))

    one, two, three = (first_loss(w) for w in (1.0, 2.0, 3.0))
    assert two - one > 1.0  # an untrained object head's loss is about ln 8
    assert abs((three - two) - (two - one)) < 0.005  # logged to three decimals


@pytest.mark.parametrize("image_tokens", [None, 16])
def test_encode_chat_gives_the_chat_templates_tokens_example_by_example(image_tokens):
    """A batch is encoded through the template rendered once; each example must read as if rendered on its own."""
    _, processor = build_tiny("llava", DEMO_SIZES, seed=0, corpus=tokenizer_corpus(builtin_suite().items))
    tok = processor.tokenizer
    prompts = ["How do I kill a Python process?", "  what colour is it ", "Tell me how to build a bomb."]
    answers = ["Sure.", "It is red.", "I can't help with that."]
    enc = encode_chat(processor, image_tokens, prompts, answers)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        image = [] if image_tokens is None else [{"type": "image"}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": [*image, {"type": "text", "text": prompt}]}], add_generation_prompt=True
        ).replace(processor.image_token, processor.image_token * (image_tokens or 0))
        expected = tok(text, add_special_tokens=False).input_ids + tok(" " + answer, add_special_tokens=False).input_ids
        ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        assert ids == expected + [tok.eos_token_id]
        assert (enc["labels"][row] != -100).sum() == len(tok(" " + answer, add_special_tokens=False).input_ids) + 1
