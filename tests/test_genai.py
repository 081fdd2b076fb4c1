"""The `ortgenai` runtime: edgekit's ONNX folders in onnxruntime-genai's own generate loop, on the tiny LLaVA-1.5.

Oracle: transformers' greedy generate with the tower exiting at k (`TorchRuntime`), on 20 eval-split suite prompts.
fp32 folders must be token-identical to it at k = 3, 12 and the default layer; every quantized folder (int4 decoder
among them) runs, its agreement printed. The merged embedding graph is checked against the host-side merge it replaces.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import full_precision_profile
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from edgekit.devices.bench import bench_in_subprocess
from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.devices.runtime import Prompt, open_runtime, processor_inputs
from edgekit.devices.torch_runtime import TorchRuntime
from edgekit.errors import UserError
from edgekit.export.artifacts import export_artifacts
from edgekit.export.manifest import read_manifest
from edgekit.export.onnx_data import data_file
from edgekit.export.onnx_format import EMBED_FILE, GENAI_CONFIG_FILE, GENAI_EMBED_FILE, Names
from edgekit.export.quantizations import ONNX_SCHEMES
from edgekit.model.loading import load
from edgekit.safety.suite import builtin_suite

MAX_NEW_TOKENS = 24
DEFAULT_LAYER = 23
PROMPTS = [Prompt(item.image(), item.prompt) for item in builtin_suite().select("eval", limit_per_kind=4)]


@pytest.fixture(scope="module")
def llava(tiny_checkpoints):
    return load(tiny_checkpoints["llava"], dtype="float32")


def _export(loaded, k: int, folder, scheme: str = "fp32"):
    return export_artifacts(loaded, k, full_precision_profile(onnx=scheme), folder, formats=("onnx",))


def _agreement(got: list[list[int]], want: list[list[int]]) -> tuple[int, float]:
    """Prompts whose tokens are identical, and the share of reference positions that match."""
    same = sum(g == w for g, w in zip(got, want))
    matched = sum(sum(a == b for a, b in zip(g, w)) for g, w in zip(got, want))
    return same, matched / sum(map(len, want))


@pytest.mark.parametrize("k", [3, 12, DEFAULT_LAYER])
def test_fp32_tokens_equal_transformers(llava, k, tmp_path):
    result = _export(llava, k, tmp_path / "fp32")
    assert "ortgenai" in {s.name for s in result.runtime_sets}
    want = [TorchRuntime(llava, k).generate(p, MAX_NEW_TOKENS) for p in PROMPTS]
    assert (
        len(PROMPTS) == 20
        and len({tuple(w) for w in want}) >= len(PROMPTS) // 4
        and sum(map(len, want)) > 4 * len(PROMPTS)
    )
    runtime = open_runtime("ortgenai", result.folder)
    got = [runtime.generate(p, MAX_NEW_TOKENS) for p in PROMPTS]
    same, share = _agreement(got, want)
    print(f"ortgenai fp32 k={k}: {same}/{len(PROMPTS)} prompts token-identical to transformers ({share:.1%} tokens)")
    assert same == len(PROMPTS)


@pytest.mark.parametrize("scheme", ONNX_SCHEMES)
def test_quantized_folders_run(llava, scheme, tmp_path):
    """Every quantized folder runs in onnxruntime-genai. Agreement with transformers is what the quantization leaves
    (printed); onnxruntime-genai must give the tokens ONNX Runtime gives for the same quantized graphs."""
    k = 12
    result = _export(llava, k, tmp_path / scheme, scheme)
    want = [TorchRuntime(llava, k).generate(p, MAX_NEW_TOKENS) for p in PROMPTS]
    runtime = open_runtime("ortgenai", result.folder)
    got = [runtime.generate(p, MAX_NEW_TOKENS) for p in PROMPTS]
    same, share = _agreement(got, want)
    first = sum(g[0] == w[0] for g, w in zip(got, want))
    print(
        f"ortgenai {scheme} k={k}: {same}/{len(PROMPTS)} prompts token-identical to transformers ({share:.1%} tokens, "
        f"first token {first}/{len(PROMPTS)})"
    )
    assert first >= len(PROMPTS) // 2
    onnx = open_runtime("onnx", result.folder)
    assert got == [onnx.generate(p, MAX_NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def fp32_k12(llava, tmp_path_factory):
    return _export(llava, 12, tmp_path_factory.mktemp("genai") / "fp32")


def test_merged_embedding_equals_host_merge(llava, fp32_k12):
    """genai_embedding.onnx places the image features exactly where edgekit's host merge does, and merges nothing
    when the features are empty (every decode step)."""
    folder = fp32_k12.folder / fp32_k12.onnx_dir
    vlm = OnnxVLM(folder)
    inputs = processor_inputs(llava.processor, PROMPTS[0])
    input_ids = inputs[Names.INPUT_IDS].numpy()
    features = vlm.vision_outputs(inputs)
    merged = ort.InferenceSession(str(folder / GENAI_EMBED_FILE), providers=["CPUExecutionProvider"])
    got = merged.run(None, {Names.INPUT_IDS: input_ids, Names.IMAGE_FEATURES: features})[0]
    np.testing.assert_array_equal(got, vlm.prompt_embeds(inputs))
    assert not np.array_equal(got, vlm.embed_ids(input_ids))  # the prompt has image tokens
    empty = np.zeros((1, 0, features.shape[-1]), np.float32)
    token = input_ids[:, :3]
    np.testing.assert_array_equal(
        merged.run(None, {Names.INPUT_IDS: token, Names.IMAGE_FEATURES: empty})[0], vlm.embed_ids(token)
    )
    # one table on disk: both embedding graphs read embed_tokens.onnx_data, and the ortgenai set counts it
    shared = data_file(folder / EMBED_FILE).name
    table = onnx.load(str(folder / GENAI_EMBED_FILE), load_external_data=False).graph.initializer
    assert {ExternalDataInfo(t).location for t in table if uses_external_data(t)} == {shared}
    assert not data_file(folder / GENAI_EMBED_FILE).exists() and (folder / GENAI_EMBED_FILE).stat().st_size < 100_000
    genai_set = next(s for s in fp32_k12.runtime_sets if s.name == "ortgenai")
    assert f"{fp32_k12.onnx_dir}/{shared}" in genai_set.paths
    config = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    assert config["model"]["embedding"]["filename"] == GENAI_EMBED_FILE
    assert config["search"]["past_present_share_buffer"] is False


def test_bench_measures_ortgenai_in_its_own_process(fp32_k12):
    row = bench_in_subprocess("ortgenai", fp32_k12.folder, prompts=2, max_new_tokens=4)
    print(f"bench ortgenai: {row}")
    assert row["runtime"] == "ortgenai" and row["prompts"] == 2 and row["first_token_ms"] > 0
    assert row["decode_tok_s"] > 0 and 0 < row["baseline_rss_mib"] <= row["peak_rss_mib"]


def test_mllama_is_refused_in_one_line(tiny_checkpoints, tmp_path):
    mllama = load(tiny_checkpoints["mllama"], dtype="float32")
    folder = _export(mllama, 4, tmp_path / "mllama").folder
    manifest = read_manifest(folder)
    assert "ortgenai" not in manifest["memory"]["sets"] and manifest["artifacts"]["genai_dir"] is None
    with pytest.raises(UserError, match="cross-attention"):
        open_runtime("ortgenai", folder)
    run = subprocess.run(
        [sys.executable, "-m", "edgekit.devices.bench", "ortgenai", str(folder)], capture_output=True, text=True
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "cross-attention" in lines[0], run.stderr
