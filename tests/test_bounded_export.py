"""Export in bounded memory, at tiny scale: the language model GGUF streams from the checkpoint's files and equals the
one written from the model in memory; a GGUF-only export never loads the model; a half-precision model is traced in
float16 as it is (no float32 copy) and its graphs compute what PyTorch does; a disk too small is refused up front."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import full_precision_profile
from test_onnx_export import FAMILY_TYPES, GEN_EXIT, build_inputs
from test_onnx_quantize import cosine

from edgekit import machine
from edgekit.devices import onnx_runtime
from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.errors import UserError
from edgekit.export import estimates
from edgekit.export.artifacts import export_artifacts
from edgekit.export.onnx_format import DECODER_FILE, DESCRIPTION_FILE, GRAPH_FILES, VISION_FILE
from edgekit.model.families import attr_path
from edgekit.model.loading import load
from edgekit.model.surgery import set_exit_layer
from edgekit.model.weights import CheckpointTensors, ModelTensors, checkpoint_dtype, language_model_tensors
from edgekit.outputs import save_processor


def _in_memory_lm(loaded) -> dict[str, torch.Tensor]:
    lm = attr_path(loaded.model, loaded.family.language_model)
    return {f"model.{k}": v for k, v in lm.state_dict().items()} | {
        "lm_head.weight": loaded.model.get_output_embeddings().weight
    }


def _resaved(source: str, out, dtype: str):
    """The checkpoint saved again by transformers in `dtype` (transformers 5's names: model.language_model.*)."""
    loaded = load(source, dtype=dtype)
    loaded.model.save_pretrained(out)
    save_processor(loaded.processor, source, out)
    return out


def test_checkpoint_tensors_read_both_layouts_lazily(tiny_checkpoints, tmp_path):
    hub = tiny_checkpoints["llava"]
    want = _in_memory_lm(load(hub, dtype="float32"))
    for folder in (hub, _resaved(hub, tmp_path / "v5", "float32")):
        tensors = CheckpointTensors(folder)
        lm = language_model_tensors(tensors)
        assert sorted(lm) == sorted(want)
        for name in lm:
            assert lm.shape(name) == tuple(want[name].shape) and lm.dtype(name) == torch.float32
            assert torch.equal(lm[name], want[name]), name
        assert checkpoint_dtype(tensors) == torch.float32
    assert checkpoint_dtype(CheckpointTensors(_resaved(hub, tmp_path / "half", "float16"))) == torch.float16


def test_gguf_streamed_from_the_files_equals_the_one_from_memory(tiny_checkpoints, tmp_path):
    from edgekit.export.gguf import write_language_model
    from edgekit.model.families import text_config

    loaded = load(tiny_checkpoints["llava"], dtype="float32")
    config, tokenizer = text_config(loaded.config), loaded.processor.tokenizer
    streamed = write_language_model(
        config, language_model_tensors(CheckpointTensors(loaded.folder)), tokenizer, tmp_path / "streamed.gguf"
    )
    whole = write_language_model(config, ModelTensors(_in_memory_lm(loaded)), tokenizer, tmp_path / "whole.gguf")
    a, b = gguf.GGUFReader(streamed), gguf.GGUFReader(whole)
    tensors_b = {t.name: t for t in b.tensors}
    assert len(a.tensors) == len(tensors_b) > 10
    for t in a.tensors:
        assert t.tensor_type == tensors_b[t.name].tensor_type and np.array_equal(t.data, tensors_b[t.name].data)


def test_a_gguf_export_never_loads_the_model(tiny_checkpoints, tmp_path):
    loaded = load(tiny_checkpoints["llava"], lazy=True)
    result = export_artifacts(loaded, 3, full_precision_profile(gguf="q4_0"), tmp_path / "out", formats=("gguf",))
    assert not loaded.in_memory
    assert [e.path for e in result.files if e.format == "gguf"] == ["lm-q4_0.gguf"]
    assert not (tmp_path / "out" / ".work").exists()


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_a_half_precision_model_is_traced_in_float16(family, tiny_checkpoints, tmp_path, monkeypatch):
    """No float32 copy: the weights in the graphs are float16, inputs and outputs stay float32 (the contract of every
    folder), the vision features match PyTorch's float32 ones, and the first logits match the float16 model's, with
    onnxruntime casting the weights per use on a CPU without room for a float32 copy."""
    half = load(_resaved(tiny_checkpoints[family], tmp_path / "half", "float16"), lazy=True)
    export = export_artifacts(half, GEN_EXIT, full_precision_profile(onnx="fp16"), tmp_path / "out", formats=("onnx",))
    assert half.model.dtype == torch.float16
    folder = export.folder / export.onnx_dir
    for name in GRAPH_FILES:
        graph = onnx.load(str(folder / name))
        weights = [
            t for t in graph.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        ]
        big = [t for t in weights if np.prod(t.dims) >= 256]
        assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big), name
        io = [v for v in [*graph.graph.input, *graph.graph.output] if v.type.tensor_type.elem_type in (1, 10)]
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in io), name
    matmul_weights = {n.input[1] for n in onnx.load(str(folder / DECODER_FILE)).graph.node if n.op_type == "MatMul"}
    assert matmul_weights & {t.name for t in onnx.load(str(folder / DECODER_FILE)).graph.initializer}
    assert "traced in float16" in (folder / DESCRIPTION_FILE).read_text()

    full = load(tiny_checkpoints[family], dtype="float32")
    roomy = OnnxVLM(folder)  # a float32 copy within the working set allowed (small): folded, the fast way
    assert roomy.decoder.get_session_options().graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    monkeypatch.setattr(onnx_runtime, "available_memory", lambda: 0)
    vlm = OnnxVLM(folder)  # no memory for the copy: float16 weights cast per use, not folded into a float32 copy
    sessions = [vlm.vision, vlm.embed, vlm.decoder]
    monkeypatch.undo()
    monkeypatch.setattr(machine, "WORKING_SET_FLOOR", 0)
    sessions.append(OnnxVLM(folder).decoder)  # as at real sizes: the decoder's copy is over a fifth of the weights
    for session in sessions:
        options = session.get_session_options()
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert not options.enable_cpu_mem_arena
    for i in range(3):
        inputs = build_inputs(half.processor, i)
        set_exit_layer(full.model, GEN_EXIT)
        with torch.no_grad():
            features = full.family.features_per_layer(full.model, inputs, [GEN_EXIT])[GEN_EXIT].numpy()
            want = half.model(**{k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}).logits
        assert cosine(vlm.image_features(inputs), features) >= 0.99
        assert cosine(_prefill_logits(vlm, inputs)[0, -1], want[0, -1].float().numpy()) >= 0.99


def _prefill_logits(vlm: OnnxVLM, inputs) -> np.ndarray:
    """The decoder's logits over the prompt (past length 0), fed as OnnxVLM.generate feeds its first step."""
    mask = inputs["attention_mask"].numpy().astype(np.int64)
    positions = np.cumsum(mask, -1) - 1
    if vlm.cross:
        cross = (vlm.vision_outputs(inputs), inputs["cross_attention_mask"].numpy().astype(np.int64))
        embeds = vlm.embed_ids(inputs["input_ids"].numpy())
    else:
        cross, embeds = None, vlm.prompt_embeds(inputs)
    return vlm.decoder_step(embeds, mask, positions, vlm.empty_past(1), cross)[0]


def test_a_disk_too_small_is_refused_before_anything_is_written(tiny_checkpoints, tmp_path, monkeypatch):
    loaded = load(tiny_checkpoints["llava"], lazy=True)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(UserError, match=r"writes about .* at its fullest; .* has 1000 B free"):
        export_artifacts(loaded, 3, full_precision_profile(gguf="q4_0"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not loaded.in_memory
    assert estimates.export_needs(loaded.config, 3, full_precision_profile(gguf="q4_0"), ("gguf",), "fp32").disk > 0


def test_int4_of_a_half_precision_model_streams_from_its_float16_trace(tiny_checkpoints, tmp_path, monkeypatch):
    """int4 on a half-precision model: traced in float16 (no float32 copy), then MatMulNBits with float16 scales
    a weight at a time; the other graphs stay float16, and the folder answers, onnxruntime optimizing the int4
    decoder as usual."""
    half = load(_resaved(tiny_checkpoints["llava"], tmp_path / "half", "float16"), lazy=True)
    export = export_artifacts(half, GEN_EXIT, full_precision_profile(onnx="int4"), tmp_path / "out", formats=("onnx",))
    folder = export.folder / export.onnx_dir
    decoder = onnx.load(str(folder / DECODER_FILE)).graph
    nbits = [n for n in decoder.node if n.op_type == "MatMulNBits"]
    scales = {t.name: t for t in decoder.initializer if t.name.endswith("_scales")}
    assert nbits and not [n for n in decoder.node if n.op_type == "MatMul" and n.input[1] in scales]
    assert all(scales[n.input[2]].data_type == onnx.TensorProto.FLOAT16 for n in nbits)
    quantization = json.loads((folder / DESCRIPTION_FILE).read_text())["quantization"]["graphs"]
    assert quantization[DECODER_FILE]["bits"] == 4 and "float16" in quantization[VISION_FILE]["method"]
    monkeypatch.setattr(onnx_runtime, "available_memory", lambda: 0)  # no room for float32 copies
    vlm = OnnxVLM(folder)
    tokens = vlm.generate(build_inputs(half.processor, 0), 8, eos_token_ids=())
    assert tokens.shape == (1, 8)
    disabled = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # per-use casts for the float16 graphs only
    assert vlm.vision.get_session_options().graph_optimization_level == disabled
    assert vlm.decoder.get_session_options().graph_optimization_level != disabled


def test_the_vision_graph_alone_serves_the_hybrid(tiny_checkpoints, tmp_path, monkeypatch):
    """The plan for a target whose budget no ONNX decoder fits but the hybrid's set does (decided from real sizes in
    test_real_sizes; tiny graphs are mostly overhead, so it is set here): the export writes the vision graph alone,
    records why, and the hybrid answers as it does from a full export; the onnx and ortgenai runtimes are refused in
    one line naming the reason."""
    from dataclasses import replace

    from edgekit.devices.runtime import Prompt, open_runtime
    from edgekit.export import artifacts
    from edgekit.export.manifest import read_manifest, verify_hashes
    from edgekit.safety.suite import builtin_suite

    profile = replace(full_precision_profile(onnx="int8_dynamic"), formats=("onnx", "gguf"))
    full = export_artifacts(load(tiny_checkpoints["llava"], lazy=True), GEN_EXIT, profile, tmp_path / "full")
    plan = estimates.OnnxPlan("int8_dynamic", decoder=False, why="target X: no decoder fits")
    monkeypatch.setattr(artifacts, "fit_to_budget", lambda *args: plan)
    alone = export_artifacts(load(tiny_checkpoints["llava"], lazy=True), GEN_EXIT, profile, tmp_path / "alone")
    assert sorted(p.name for p in (alone.folder / alone.onnx_dir).iterdir()) == [DESCRIPTION_FILE, VISION_FILE]
    assert [s.name for s in alone.runtime_sets] == ["hybrid"]
    manifest = read_manifest(alone.folder)
    assert manifest["quantization"]["fitted_to_budget"] == plan.why and not verify_hashes(alone.folder)

    prompts = [Prompt(item.image(), item.prompt) for item in builtin_suite().select("eval", limit_per_kind=2)]
    want, got = (open_runtime("hybrid", e.folder) for e in (full, alone))
    assert [got.generate(p, 8) for p in prompts] == [want.generate(p, 8) for p in prompts]
    for kind in ("onnx", "ortgenai"):
        with pytest.raises(UserError, match=f"has no {kind} runtime: no ONNX decoder: target X"):
            open_runtime(kind, alone.folder)
