"""The demo trainer's recipe options, on a few steps of each stage (the full recipe trains for minutes)."""

from __future__ import annotations

import json

import torch

from edgekit.model.demo import DemoRecipe, train_demo
from edgekit.model.loading import load
from edgekit.safety.images import render
from edgekit.safety.suite import builtin_suite

FEW_STEPS = dict(tower_steps=2, chat_steps=2, text_steps=2, projector_steps=2, warmup=1, batch=4, pool=16)


def test_tower_common_puts_one_vector_in_every_token_from_the_first_layer(tmp_path):
    out = train_demo(tmp_path / "demo", DemoRecipe(**FEW_STEPS, tower_common=30.0, replay=0.25), log=lambda _: None)
    record = json.loads((out / "edgekit_demo.json").read_text())
    assert record["recipe"]["tower_common"] == 30.0 and record["recipe"]["replay"] == 0.25
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
