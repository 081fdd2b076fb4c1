"""Exit-layer surgery: a truncated checkpoint, reloaded by plain transformers, equals the original exiting at k."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import processor_inputs
from transformers import AutoModelForImageTextToText

from edgekit.model.families import FAMILIES, family_for
from edgekit.model.loading import load
from edgekit.model.surgery import num_exit_layers, set_exit_layer, truncate, truncate_checkpoint

FAMILY_TYPES = [f.model_types[0] for f in FAMILIES]


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_truncated_checkpoint_equals_exit_at_every_layer(family, tiny_checkpoints, tmp_path):
    loaded = load(tiny_checkpoints[family], dtype="float32")
    inputs = processor_inputs(loaded.processor)
    n_layers = num_exit_layers(loaded.model)
    assert n_layers == (32 if family == "mllama" else 24)
    for k in range(1, n_layers + 1):
        fresh = loaded.with_model(copy.deepcopy(loaded.model))
        set_exit_layer(loaded.model, k)
        expected = _logits(loaded.model, inputs)
        out = truncate_checkpoint(fresh, k, tmp_path / f"k{k}")
        reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
        assert family_for(reloaded.config).num_layers(reloaded.config) == k
        diff = (_logits(reloaded, inputs) - expected).abs().max().item()
        assert diff <= 1e-5, f"{family} k={k}: max abs logit diff {diff}"


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_exit_layer_changes_the_output(family, tiny_checkpoints):
    """Guards the test above from passing vacuously: different exits must give different logits."""
    loaded = load(tiny_checkpoints[family], dtype="float32")
    inputs = processor_inputs(loaded.processor)
    set_exit_layer(loaded.model, 3)
    early = _logits(loaded.model, inputs)
    set_exit_layer(loaded.model, 12)
    assert (early - _logits(loaded.model, inputs)).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_truncation_removes_exactly_the_dropped_blocks(family, tiny_checkpoints):
    model = load(tiny_checkpoints[family], dtype="float32").model
    before = {n: p.numel() for n, p in model.named_parameters()}
    blocks = family_for(model.config).stack(model).layers
    k = 7
    dropped = {id(p) for block in blocks[k:] for p in block.parameters()}
    dropped_numel = sum(p.numel() for block in blocks[k:] for p in block.parameters())
    kept_ids = {id(p) for p in model.parameters()} - dropped
    truncate(model, k)
    after = dict(model.named_parameters())
    assert sum(before.values()) - sum(p.numel() for p in after.values()) == dropped_numel > 0
    assert {id(p) for p in after.values()} == kept_ids  # nothing else removed, nothing copied
    assert all(before[n] == p.numel() for n, p in after.items())


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_exit_in_memory_shares_weights(family, tiny_checkpoints):
    model = load(tiny_checkpoints[family], dtype="float32").model
    storage = {p.data_ptr() for p in model.parameters()}
    set_exit_layer(model, 5)
    assert {p.data_ptr() for p in model.parameters()} <= storage
    set_exit_layer(model, num_exit_layers(model))  # back to the full tower, from the remembered blocks
    assert {p.data_ptr() for p in model.parameters()} == storage


def test_truncated_checkpoint_loads_without_edgekit(tiny_checkpoints, tmp_path):
    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    inputs = processor_inputs(loaded.processor)
    set_exit_layer(loaded.model, 9)
    expected = _logits(loaded.model, inputs)
    torch.save({k: v for k, v in inputs.items()}, tmp_path / "inputs.pt")
    out = truncate_checkpoint(loaded.with_model(copy.deepcopy(loaded.model)), 9, tmp_path / "cut")
    script = f"""
import json, sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()
AutoProcessor.from_pretrained({str(out)!r})
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
with torch.no_grad():
    torch.save(model(**inputs).logits, {str(tmp_path / "logits.pt")!r})
print(json.dumps({{"edgekit_imported": any(m.startswith("edgekit") for m in sys.modules)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"edgekit_imported": False}
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 9 and config["vision_feature_layer"] == 9


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_features_per_layer_match_the_exited_model(family, tiny_checkpoints):
    """One tower forward yields every layer's projected features, equal to what the model uses when exiting there."""
    loaded = load(tiny_checkpoints[family], dtype="float32")
    model, fam = loaded.model, loaded.family
    inputs = processor_inputs(loaded.processor)
    layers = list(range(1, num_exit_layers(model) + 1))
    with torch.no_grad():
        features = fam.features_per_layer(model, inputs, layers)
    for k in (1, 6, layers[-1]):
        set_exit_layer(model, k)
        diff = (_logits(model, fam.lm_inputs(model, inputs, features[k])) - _logits(model, inputs)).abs().max()
        assert diff <= 1e-5, f"{family} k={k}: {diff}"


def test_exit_after_a_full_tower_forward_reports_k_hidden_states(tiny_checkpoints):
    """Regression: hidden-state hooks installed by a forward of the uncut tower must not be installed twice."""
    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    inputs = processor_inputs(loaded.processor)
    tower = loaded.model.model.vision_tower
    with torch.no_grad():
        assert len(tower(inputs["pixel_values"], output_hidden_states=True).hidden_states) == 25
        set_exit_layer(loaded.model, 4)
        assert len(tower(inputs["pixel_values"], output_hidden_states=True).hidden_states) == 5
        set_exit_layer(loaded.model, 24)
        assert len(tower(inputs["pixel_values"], output_hidden_states=True).hidden_states) == 25
