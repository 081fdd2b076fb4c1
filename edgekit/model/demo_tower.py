"""The demo model's tower stage: the vision tower learns to see from its default layer alone, as LLaVA's CLIP tower
was trained before LLaVA; and the pool of pictures whose default-layer tokens the later stages read."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.model.demo_data import ScenePool, random_scene, scene_labels
from edgekit.model.train_steps import adamw, in_threads, split, train_step, warmup_cosine
from edgekit.safety.images import COLORS, COUNT_WORDS, OBJECTS, POSITIONS, render

if TYPE_CHECKING:
    from edgekit.model.demo import DemoRecipe

DEFAULT_LAYER = 23  # of 24, the layer LLaVA-1.5 reads (`vision_feature_layer` -2)


def train_tower(
    model, processor, recipe: DemoRecipe, log: Callable[[str], None], device: str = "cpu"
) -> dict[str, float]:
    """Stage 1: teach the tower to see, reading only the default layer's patch tokens."""
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = nn.ModuleDict(
        {
            "object": nn.Linear(width, len(OBJECTS) + 1),
            "color": nn.Linear(width, len(COLORS)),
            "position": nn.Linear(width, len(POSITIONS)),
            "count": nn.Linear(width, len(COUNT_WORDS)),
        }
    ).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = adamw(params, recipe.tower_lr, recipe.batch_parts)
    sched = warmup_cosine(opt, recipe.warmup, recipe.tower_steps)
    weights = {"object": recipe.tower_object_weight}
    rng = random.Random(recipe.seed * 1000 + 1)
    tower.train()
    acc: dict[str, float] = {}

    def part_loss(scenes: list, labels: dict, counts: dict) -> tuple[torch.Tensor, dict]:
        """A part's share of the step's loss: its pictures' head losses over the whole batch's labelled counts."""
        hidden = _default_layer_tokens(tower, processor, scenes, device).mean(1)
        logits = {k: head(hidden) for k, head in heads.items()}
        return sum(_head_loss(logits[k], labels[k], counts[k]) * weights.get(k, 1.0) for k in heads), logits

    for step in range(recipe.tower_steps):
        scenes = [random_scene(rng) for _ in range(recipe.tower_batch or recipe.batch)]
        labels = {k: torch.tensor([scene_labels(s)[k] for s in scenes], device=device) for k in heads}
        counts = {k: (v != -100).sum().clamp(min=1) for k, v in labels.items()}
        parts = [
            partial(part_loss, scenes[rows], {k: v[rows] for k, v in labels.items()}, counts)
            for rows in split(len(scenes), recipe.batch_parts)
        ]
        loss, logits = train_step(opt, sched, params, parts, recipe.batch_parts)
        if step % 100 == 0 or step == recipe.tower_steps - 1:
            acc = {k: _accuracy(torch.cat([part[k] for part in logits]), labels[k]) for k in heads}
            log(f"tower step {step} loss {loss.item():.3f} " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    tower.eval()
    return acc


def _default_layer_tokens(tower, processor, scenes: list, device: str) -> torch.Tensor:
    """The scenes drawn and read by the tower: its default layer's patch tokens, CLS left out, as LLaVA-1.5 reads."""
    pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"].to(device)
    return tower(pixels, output_hidden_states=True).hidden_states[DEFAULT_LAYER][:, 1:]


def _head_loss(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the pictures of a part that a head has labels for, over `count`, the whole batch's
    such pictures held at least 1 (a batch without dots has no count to learn): the parts' shares add up to the mean."""
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / count


def _accuracy(logits, labels) -> float:
    valid = labels != -100
    return float((logits.argmax(-1)[valid] == labels[valid]).float().mean()) if valid.any() else float("nan")


def scene_pool(model, processor, rng: random.Random, size: int, device: str = "cpu", threads: int = 1) -> ScenePool:
    scenes = [random_scene(rng) for _ in range(size)]
    tower = model.model.vision_tower

    @torch.no_grad()  # in the thread that runs it: grad mode is per thread
    def features(start: int) -> torch.Tensor:
        return _default_layer_tokens(tower, processor, scenes[start : start + 256], device)

    chunks = in_threads(features, range(0, size, 256), threads)
    by_object: dict[str, list[int]] = {}
    for i, s in enumerate(scenes):
        by_object.setdefault(s.obj if s.kind == "object" else "dots", []).append(i)
    return ScenePool(scenes, torch.cat(chunks), by_object)
