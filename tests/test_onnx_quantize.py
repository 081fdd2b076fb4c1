"""Quantized ONNX folders: image features stay close to PyTorch (cosine >= 0.99); greedy agreement with the fp32
folder (token-identical to PyTorch, see test_onnx_export) is measured and reported. A random tiny language model has
nearly flat logits, so its greedy agreement says little about a trained model's; it is printed, not gated."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from test_onnx_export import FAMILY_TYPES, GEN_EXIT, MAX_NEW_TOKENS, build_inputs, pytorch_features, tiny_family

from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.errors import UserError
from edgekit.export.onnx_format import DECODER_FILE, DESCRIPTION_FILE, EMBED_FILE, VISION_FILE
from edgekit.export.onnx_quantize import quantize
from edgekit.export.quantizations import ONNX_SCHEMES

FAST_PROMPTS, SLOW_PROMPTS = 3, 20
CALIBRATION = range(50, 52)  # benign calibration images + prompts, disjoint from the evaluation ones
_QUANTIZED: dict = {}
_REFERENCE_TOKENS: dict = {}


def quantized(family, scheme, tiny_checkpoints, tmp_path_factory):
    tiny = tiny_family(family, tiny_checkpoints, tmp_path_factory)
    if (family, scheme) not in _QUANTIZED:
        calibration = [build_inputs(tiny.loaded.processor, i) for i in CALIBRATION]
        out = tiny.root / f"q-{scheme}"
        _QUANTIZED[family, scheme] = quantize(tiny.folder(GEN_EXIT), scheme, out, calibration_inputs=calibration)
    return tiny, _QUANTIZED[family, scheme]


def reference_tokens(family, tiny, i) -> np.ndarray:
    """Greedy tokens of the fp32 folder, eos disabled so every prompt compares MAX_NEW_TOKENS positions."""
    if (family, i) not in _REFERENCE_TOKENS:
        vlm = OnnxVLM(tiny.folder(GEN_EXIT))
        _REFERENCE_TOKENS[family, i] = vlm.generate(build_inputs(tiny.loaded.processor, i), MAX_NEW_TOKENS, ())[0]
    return _REFERENCE_TOKENS[family, i]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check(family, scheme, n_prompts, tiny_checkpoints, tmp_path_factory):
    tiny, export = quantized(family, scheme, tiny_checkpoints, tmp_path_factory)
    vlm = OnnxVLM(export.folder)
    cosines, agreement, identical = [], [], 0
    for i in range(n_prompts):
        inputs = build_inputs(tiny.loaded.processor, i)
        cosines.append(cosine(vlm.image_features(inputs), pytorch_features(tiny, inputs, GEN_EXIT)))
        ref, got = reference_tokens(family, tiny, i), vlm.generate(inputs, MAX_NEW_TOKENS, eos_token_ids=())[0]
        agreement.append(float((ref == got).mean()))
        identical += bool((ref == got).all())
    mean_agreement = float(np.mean(agreement))
    print(
        f"{family} {scheme}: vision cosine min {min(cosines):.5f}, greedy agreement {mean_agreement:.3f} "
        f"({identical}/{n_prompts} prompts identical)"
    )
    assert min(cosines) >= 0.99, f"{family} {scheme}: vision feature cosine {min(cosines)}"
    assert math.isfinite(mean_agreement) and 0.0 <= mean_agreement <= 1.0


@pytest.mark.parametrize("scheme", ONNX_SCHEMES)
@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_quantized_features_close_and_greedy_agreement_reported(family, scheme, tiny_checkpoints, tmp_path_factory):
    _check(family, scheme, FAST_PROMPTS, tiny_checkpoints, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ONNX_SCHEMES)
@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_quantized_greedy_agreement_many_prompts(family, scheme, tiny_checkpoints, tmp_path_factory):
    _check(family, scheme, SLOW_PROMPTS, tiny_checkpoints, tmp_path_factory)


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("scheme", ONNX_SCHEMES)
def test_quantized_graphs_hold_the_scheme(scheme, tiny_checkpoints, tmp_path_factory):
    """Each scheme leaves its mark on the graphs it claims to change, and the JSON records it."""
    _, export = quantized("llava", scheme, tiny_checkpoints, tmp_path_factory)
    folder, recorded = export.folder, export.description["quantization"]
    assert recorded["scheme"] == scheme and (folder / DESCRIPTION_FILE).is_file()
    if scheme == "int8_dynamic":
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= _ops(folder / DECODER_FILE)
        assert "MatMulInteger" in _ops(folder / VISION_FILE)
    elif scheme == "int8_qdq":
        for name in (VISION_FILE, DECODER_FILE):
            graph = onnx.load(str(folder / name)).graph
            assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
            inits = {i.name: i for i in graph.initializer}
            quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
            zero_points = [inits[n.input[2]] for n in quantize if n.input[2] in inits]
            assert zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points)
            assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric: zero point 0
    elif scheme == "int4":
        assert "MatMulNBits" in _ops(folder / DECODER_FILE) and "MatMulNBits" not in _ops(folder / VISION_FILE)
    else:
        for name in (VISION_FILE, EMBED_FILE, DECODER_FILE):
            graph = onnx.load(str(folder / name)).graph
            assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
            io = list(graph.input) + list(graph.output)
            assert all(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for v in io)  # keep_io_types
        vision = onnx.load(str(folder / VISION_FILE)).graph
        types = {v.name: v.type.tensor_type.elem_type for v in vision.value_info}
        norms = [n for n in vision.node if n.op_type in ("LayerNormalization", "Softmax")]
        matmuls = [n for n in vision.node if n.op_type == "MatMul"]
        assert norms and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in norms)  # kept in fp32
        assert matmuls and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)  # the rest is fp16


def test_qdq_needs_calibration_and_schemes_are_checked(tiny_checkpoints, tmp_path_factory, tmp_path):
    tiny = tiny_family("llava", tiny_checkpoints, tmp_path_factory)
    with pytest.raises(UserError, match="calibration"):
        quantize(tiny.folder(GEN_EXIT), "int8_qdq", tmp_path / "q")
    with pytest.raises(UserError, match="int8_dynamic"):
        quantize(tiny.folder(GEN_EXIT), "int3", tmp_path / "q")
