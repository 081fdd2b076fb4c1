"""ONNX export: the three graphs run in onnxruntime and equal PyTorch (transformers' own code) for every family.

Oracles: `Family.features_per_layer` of the UNCUT model (image features at exit k) and transformers' greedy
`generate` with the model exiting at k. Tiny random checkpoints still decode deterministically; both sides stop at
their first eos, and the comparison covers everything up to and including it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import sample_image

from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.export.onnx import export_onnx
from edgekit.export.onnx_format import (
    DECODER_FILE,
    DESCRIPTION_FILE,
    EMBED_FILE,
    GRAPH_FILES,
    NEWLINE_FILE,
    VISION_FILE,
    Names,
)
from edgekit.model.families import FAMILIES
from edgekit.model.loading import LoadedModel, load
from edgekit.model.surgery import num_exit_layers, set_exit_layer
from edgekit.safety.suite import builtin_suite

FAMILY_TYPES = [f.model_types[0] for f in FAMILIES]
GEN_EXIT = 12  # the exit layer of the full three-graph export used for generation and quantization
MAX_NEW_TOKENS = 32
FAST_PROMPTS, SLOW_PROMPTS = 5, 20
# Requests of every kind from the built-in suite's eval split (harmful, risky-looking benign, visual questions).
PROMPTS = [item.prompt for item in builtin_suite().select("eval", limit_per_kind=SLOW_PROMPTS // 5)]
# Non-square sizes in both orientations: LLaVA-NeXT's unpadding takes both branches, Mllama picks different tilings.
IMAGE_SIZES = [(40, 60), (60, 40), (36, 36), (30, 84), (84, 30)]


def build_inputs(processor, i: int) -> dict:
    """Processor-built inputs for prompt i with its own image, as a real caller would build them."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = sample_image(seed=100 + i, size=IMAGE_SIZES[i % len(IMAGE_SIZES)])
    return dict(processor(images=image, text=prompt, return_tensors="pt"))


# --- shared, built once per session (the quantization tests import these too) ------------------------------------
@dataclass
class Tiny:
    loaded: LoadedModel
    default_exit: int
    num_layers: int
    root: Path
    folders: dict = field(default_factory=dict)

    def exit(self, k) -> int:
        return self.default_exit if k == "default" else k

    def folder(self, k, parts=GRAPH_FILES) -> Path:
        """The model exported at exit k (memoised); `parts` as in export_onnx."""
        k = self.exit(k)
        key = (k, tuple(parts))
        if key not in self.folders:
            inputs = build_inputs(self.loaded.processor, 0)
            out = self.root / f"k{k}-{len(parts)}"
            export_onnx(
                self.loaded.model, self.loaded.processor, self.loaded.family, k, out, sample_inputs=inputs, parts=parts
            )
            self.folders[key] = out
        return self.folders[key]

    def vision_folder(self, k) -> Path:
        """A folder whose vision graph exits at k: the full export at GEN_EXIT, the vision graph alone elsewhere."""
        k = self.exit(k)
        return self.folder(k, GRAPH_FILES if k == GEN_EXIT else (VISION_FILE,))


_TINY: dict[str, Tiny] = {}


def tiny_family(family: str, tiny_checkpoints, tmp_path_factory) -> Tiny:
    if family not in _TINY:
        loaded = load(tiny_checkpoints[family], dtype="float32")
        default = loaded.family.default_exit(loaded.model.config)  # before any cut changes the config
        root = tmp_path_factory.mktemp(f"onnx-{family}")
        _TINY[family] = Tiny(loaded, default, num_exit_layers(loaded.model), root)
    return _TINY[family]


def pytorch_features(tiny: Tiny, inputs: dict, k: int) -> np.ndarray:
    """Image features at exit k from the UNCUT model (one full tower forward), as the family table computes them."""
    model = tiny.loaded.model
    set_exit_layer(model, tiny.num_layers)
    with torch.no_grad():
        return tiny.loaded.family.features_per_layer(model, inputs, [k])[k].float().numpy()


def pytorch_greedy(tiny: Tiny, inputs: dict, k: int, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """transformers' greedy generate with the model exiting at k; the new tokens only."""
    model, family = tiny.loaded.model, tiny.loaded.family
    set_exit_layer(model, k)
    with torch.no_grad():
        if family.cross_attention:
            # Not family.lm_inputs: generate() would hand `cross_attention_states` to every decode step and the
            # cross-attention cache would append a second copy of the image K/V. From pixel_values, transformers
            # runs its own tower (cut at k) once, at prefill.
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            return out[0, inputs["input_ids"].shape[1] :].tolist()
        features = family.features_per_layer(model, inputs, [k])[k]
        out = model.generate(
            **family.lm_inputs(model, inputs, features), do_sample=False, max_new_tokens=max_new_tokens
        )
        return out[0].tolist()


def until_eos(tokens, eos) -> list[int]:
    tokens = [int(t) for t in tokens]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def node_count(path: Path) -> int:
    return len(onnx.load(str(path)).graph.node)


# --- fp32 parity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, GEN_EXIT, "default"])
@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_vision_features_match_pytorch(family, k, tiny_checkpoints, tmp_path_factory):
    tiny = tiny_family(family, tiny_checkpoints, tmp_path_factory)
    k = tiny.exit(k)
    vlm = OnnxVLM(tiny.vision_folder(k))
    diffs = []
    for i in range(3):
        inputs = build_inputs(tiny.loaded.processor, i)
        expected = pytorch_features(tiny, inputs, k)
        got = vlm.image_features(inputs)
        assert got.shape == expected.shape
        diffs.append(float(np.abs(got - expected).max()))
    print(f"{family} k={k}: vision features max abs diff {max(diffs):.2e}")
    assert max(diffs) <= 1e-4, f"{family} k={k}: max abs diff {max(diffs)}"


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_vision_graph_holds_exactly_k_blocks(family, tiny_checkpoints, tmp_path_factory):
    """The cut is in the graph: its node count grows by the same amount for every block kept."""
    tiny = tiny_family(family, tiny_checkpoints, tmp_path_factory)
    ks = [3, GEN_EXIT, tiny.default_exit]
    counts = [node_count(tiny.vision_folder(k) / VISION_FILE) for k in ks]
    assert counts[0] < counts[1] < counts[2], counts
    per_block = [(counts[i + 1] - counts[i]) / (ks[i + 1] - ks[i]) for i in range(2)]
    assert per_block[0] == per_block[1] > 0, (ks, counts)


def _check_greedy(family: str, tiny: Tiny, k: int, n_prompts: int) -> None:
    vlm = OnnxVLM(tiny.folder(k))
    eos = set(vlm.config["eos_token_ids"])
    expected, got = [], []
    for i in range(n_prompts):
        inputs = build_inputs(tiny.loaded.processor, i)
        expected.append(until_eos(pytorch_greedy(tiny, inputs, k), eos))
        got.append(until_eos(vlm.generate(inputs, MAX_NEW_TOKENS)[0], eos))
    identical = sum(e == g for e, g in zip(expected, got))
    print(f"{family} k={k}: {identical}/{n_prompts} prompts token-identical, {sum(map(len, got))} tokens")
    assert got == expected
    assert sum(map(len, expected)) >= 4 * n_prompts  # not vacuous: real decoding happened
    assert len({tuple(e) for e in expected}) > 1  # and it depends on the prompt and image


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_greedy_generation_token_identical(family, tiny_checkpoints, tmp_path_factory):
    _check_greedy(family, tiny_family(family, tiny_checkpoints, tmp_path_factory), GEN_EXIT, FAST_PROMPTS)


@pytest.mark.slow
@pytest.mark.parametrize("k", [3, GEN_EXIT, "default"])
@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_greedy_generation_token_identical_many_prompts(family, k, tiny_checkpoints, tmp_path_factory):
    tiny = tiny_family(family, tiny_checkpoints, tmp_path_factory)
    _check_greedy(family, tiny, tiny.exit(k), SLOW_PROMPTS)


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_kv_cache_decoding_matches_full_forward(family, tiny_checkpoints, tmp_path_factory):
    """Prefill (past length 0) and single-token steps with the cache give the logits of one full PyTorch forward."""
    tiny = tiny_family(family, tiny_checkpoints, tmp_path_factory)
    vlm = OnnxVLM(tiny.folder(GEN_EXIT))
    inputs = build_inputs(tiny.loaded.processor, 1)
    model = tiny.loaded.model
    set_exit_layer(model, GEN_EXIT)
    extra = torch.tensor([[5, 17, 42]])  # three more tokens, decoded one by one
    full = dict(
        inputs,
        input_ids=torch.cat([inputs["input_ids"], extra], 1),
        attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 3, dtype=torch.long),
    )
    cross = None
    if vlm.cross:
        mask = inputs["cross_attention_mask"]
        full["cross_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, 3, -1, -1)], 1)
        cross = (vlm.vision_outputs(inputs), mask.numpy())
        embeds = vlm.embed_ids(inputs["input_ids"].numpy())
    else:
        embeds = vlm.prompt_embeds(inputs)
    with torch.no_grad():
        expected = model(**full).logits[0].numpy()
    n = inputs["input_ids"].shape[1]
    mask = np.ones((1, n), np.int64)
    logits, past = vlm.decoder_step(embeds, mask, np.arange(n)[None], vlm.empty_past(1), cross)
    steps = [logits[0]]
    for j, token in enumerate(extra[0].tolist()):
        mask = np.ones((1, n + j + 1), np.int64)
        if cross is not None:
            cross = (cross[0], cross[1][:, -1:])
        logits, past = vlm.decoder_step(vlm.embed_ids(np.array([[token]])), mask, np.array([[n + j]]), past, cross)
        steps.append(logits[0])
    diff = float(np.abs(np.concatenate(steps) - expected).max())
    print(f"{family}: logits max abs diff over prefill + 3 cached steps {diff:.2e}")
    assert diff <= 1e-4
    assert past[Names.past(vlm.config["decoder"]["past_layers"][0], "key")].shape[2] == n + 3


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_description_json(family, tiny_checkpoints, tmp_path_factory):
    tiny = tiny_family(family, tiny_checkpoints, tmp_path_factory)
    folder = tiny.folder(GEN_EXIT)
    vlm = OnnxVLM(folder)
    desc, config = vlm.config, tiny.loaded.model.config
    assert (folder / DESCRIPTION_FILE).is_file() and all((folder / f).is_file() for f in GRAPH_FILES)
    assert desc["exit_layer"] == GEN_EXIT and desc["num_exit_layers"] == tiny.num_layers
    assert desc["image_token_id"] == config.image_token_id and desc["eos_token_ids"]
    assert desc["chat_template"] == tiny.loaded.processor.chat_template
    pre = desc["preprocessing"]
    assert pre["image_mean"] and pre["image_std"] and pre["processor_class"] == type(tiny.loaded.processor).__name__
    decoder_io = desc["graphs"][DECODER_FILE]
    inputs = {t["name"]: t for t in decoder_io["inputs"]}
    outputs = {t["name"] for t in decoder_io["outputs"]}
    layers = desc["decoder"]["past_layers"]
    for layer in layers:
        assert inputs[Names.past(layer, "key")]["shape"][2] == "past_sequence_length"
        assert {Names.present(layer, "key"), Names.present(layer, "value")} <= outputs
    assert inputs[Names.INPUTS_EMBEDS]["shape"][:2] == ["batch_size", "sequence_length"]
    assert inputs[Names.ATTENTION_MASK]["dtype"] == "int64"
    assert [t["name"] for t in desc["graphs"][EMBED_FILE]["outputs"]] == [Names.INPUTS_EMBEDS]
    assert [t["name"] for t in desc["graphs"][VISION_FILE]["outputs"]] == [Names.IMAGE_FEATURES]
    assert [t["name"] for t in desc["graphs"][VISION_FILE]["inputs"]] == list(tiny.loaded.family.onnx_vision_axes)
    if family == "llava_next":
        assert desc["anyres"]["grid_pinpoints"] == config.image_grid_pinpoints
        assert (folder / NEWLINE_FILE).is_file()
    if family == "mllama":
        assert set(layers).isdisjoint(config.text_config.cross_attention_layers)
        assert {Names.CROSS_ATTENTION_STATES, Names.CROSS_ATTENTION_MASK} <= set(inputs)
    else:
        assert len(layers) == config.text_config.num_hidden_layers
