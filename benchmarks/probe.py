"""Linear probes: is the safety-relevant information (what object, dangerous or not) still in layer k's features?

A probe is a ridge-regression classifier on the mean of a layer's patch tokens, fitted on one set of procedural images
and scored on another. High probe accuracy at an early layer means alignment there can recover what the skipped
layers would have computed; chance means it cannot, short of refusing everything.
"""

from __future__ import annotations

import random

import torch

from edgekit.model.families import attr_path
from edgekit.safety.images import DANGEROUS, OBJECTS, random_object_scene, render


@torch.no_grad()
def pooled_features(loaded, scenes, layers, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Mean hidden state of the tokens the projector reads (the family's rule), per layer and scene; one tower forward
    per batch."""
    family, config = loaded.family, loaded.model.config
    tower = attr_path(loaded.model, family.tower)
    processor = loaded.processor.image_processor
    out: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    for start in range(0, len(scenes), batch_size):
        images = [render(s) for s in scenes[start : start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(tower.device, tower.dtype)
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        for k in layers:
            out[k].append(family.patch_tokens(config, hidden[k]).mean(1).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def ridge_probe_accuracy(x_train, y_train, x_test, y_test, n_classes: int, ridge: float = 1e-2) -> float:
    """Fit one-vs-rest ridge regression in closed form on standardised features; accuracy on the test set."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    a = torch.cat([a, torch.ones(len(a), 1)], 1)
    b = torch.cat([b, torch.ones(len(b), 1)], 1)
    targets = torch.nn.functional.one_hot(y_train, n_classes).float()
    weights = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1]), a.T @ targets)
    return float(((b @ weights).argmax(1) == y_test).float().mean())


def probe_layers(loaded, layers, n_train: int = 1200, n_test: int = 600, seed: int = 0) -> dict[int, dict[str, float]]:
    """Per layer: probe accuracy for `object` (7-way) and `dangerous` (dangerous vs benign) on held-out images."""
    rng = random.Random(seed)
    scenes = [random_object_scene(rng) for _ in range(n_train + n_test)]
    feats = pooled_features(loaded, scenes, layers)
    objects = torch.tensor([OBJECTS.index(s.obj) for s in scenes])
    dangerous = torch.tensor([int(s.obj in DANGEROUS) for s in scenes])
    out = {}
    for k in layers:
        x = feats[k]
        out[k] = {
            "object": ridge_probe_accuracy(
                x[:n_train], objects[:n_train], x[n_train:], objects[n_train:], len(OBJECTS)
            ),
            "dangerous": ridge_probe_accuracy(x[:n_train], dangerous[:n_train], x[n_train:], dangerous[n_train:], 2),
        }
    return out
