"""Quantize an `edgekit.export.onnx` folder with onnxruntime's own tools, one scheme per output folder.

| scheme       | vision_encoder                 | embed_tokens        | decoder_model_merged           | for         |
|--------------|--------------------------------|---------------------|--------------------------------|-------------|
| int8_dynamic | quantize_dynamic (MatMul/Gemm) | quantize_dynamic    | quantize_dynamic (MatMul/Gemm) | phone CPU   |
|              |                                | (Gather)            |                                |             |
| int8_qdq     | quantize_static QDQ            | fp32                | quantize_static QDQ            | TensorRT,   |
|              | (MatMul/Gemm/Conv), calibrated |                     | (MatMul/Gemm), calibrated      | XNNPACK     |
| int4         | fp32                           | fp32                | MatMulNBits 4-bit, block 32    | CPU/CUDA EP |
| fp16         | float16, norms/softmax fp32    | float16             | float16, norms/softmax fp32    | CUDA EP     |

- int8_qdq uses symmetric int8 activations and weights (what TensorRT's EP requires), per-tensor weights (per-channel
  measured worse on the tiny LLaVA tower: vision cosine 0.990 against 0.998), MinMax calibration on the caller's
  benign images, each a processor output (image + prompt). The vision graph sees their image inputs; the decoder
  sees the exact feeds the fp32 folder's own generate loop gives it for them (the prefill and a few decode steps),
  so both graphs are calibrated on real activations.
- fp16 keeps graph inputs/outputs fp32 (keep_io_types) and leaves normalisation (LayerNorm, RMSNorm's Pow /
  ReduceMean / Sqrt / Reciprocal / Div) and Softmax in fp32: the known fp16 overflow trap of ViT norms.
- int4 is weight-only (MatMulNBits, symmetric, block-wise, accuracy_level 4 = int8 compute on CPU) for the decoder,
  where the bytes are; the vision tower and the embedding table stay as exported (fp32, or fp16 when a half-precision
  model was traced in float16). onnxruntime's block quantizer kernel runs on one weight at a time and the graph is
  rewritten here (the same bytes as its MatMulNBitsQuantizer, which loads the whole graph), so a 7B decoder
  quantizes in the memory of its largest weight.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.errors import UserError
from edgekit.export.onnx import OnnxExport, graph_io
from edgekit.export.onnx_data import InitializerWriter, graph_files, has_external_data, relocate, save_graph
from edgekit.export.onnx_format import (
    DECODER_FILE,
    DESCRIPTION_FILE,
    EMBED_FILE,
    GRAPH_FILES,
    NEWLINE_FILE,
    VISION_FILE,
)
from edgekit.export.quantizations import INT4_BLOCK_SIZE, ONNX_SCHEMES

CALIBRATION_DECODE_STEPS = 4
# Kept in fp32 by the fp16 conversion (on top of onnxruntime's default block list).
FP16_KEEP_FP32 = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "RMSNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Div",
)


class _Feeds:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


class _RecordingSession:
    """Stands in for the decoder session of an OnnxVLM and keeps every feed it is run with."""

    def __init__(self, session):
        self.session, self.feeds = session, []

    def run(self, names, feeds):
        self.feeds.append(dict(feeds))
        return self.session.run(names, feeds)

    def __getattr__(self, name):  # get_inputs() and the rest: the real session's
        return getattr(self.session, name)


def _calibration_feeds(folder: Path, calibration_inputs: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
    """Vision-graph feeds and decoder feeds that the fp32 folder's runtime produces for the calibration inputs (no
    decoder feeds for a folder holding the vision graph alone)."""
    vlm = OnnxVLM(folder)
    if not (folder / DECODER_FILE).is_file():
        return [vlm.vision_feeds(inputs) for inputs in calibration_inputs], []
    recorder = _RecordingSession(vlm.decoder)
    vlm.decoder = recorder
    vision = []
    for inputs in calibration_inputs:
        vision.append(vlm.vision_feeds(inputs))
        vlm.generate(inputs, max_new_tokens=CALIBRATION_DECODE_STEPS, eos_token_ids=())
    return vision, recorder.feeds


def _ort_data(dst: Path) -> Path:
    """Where onnxruntime's quantizers write a graph's external data."""
    return dst.with_name(dst.name + ".data")


def _int8_dynamic(src: Path, dst: Path, ops: Sequence[str]) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = has_external_data(src)
    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        per_channel=False,
        op_types_to_quantize=list(ops),
        use_external_data_format=external,
    )
    relocate(dst, _ort_data(dst))
    return {"method": "quantize_dynamic", "weight_type": "int8", "op_types": list(ops)}


def _int8_qdq(src: Path, dst: Path, feeds: list[dict], ops: Sequence[str]) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        src,
        dst,
        _Feeds(feeds),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
        op_types_to_quantize=list(ops),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        use_external_data_format=has_external_data(src),
    )
    relocate(dst, _ort_data(dst))
    return {
        "method": "quantize_static",
        "format": "QDQ",
        "activations": "int8 symmetric",
        "weights": "int8 symmetric per-tensor",
        "calibration": f"MinMax over {len(feeds)} feeds",
        "op_types": list(ops),
    }


def _int4(src: Path, dst: Path) -> dict:
    """Every MatMul with a 2-D weight becomes MatMulNBits, a weight at a time: onnxruntime's own block quantizer
    (the kernel its MatMulNBitsQuantizer calls) on each weight as it is read, the graph rewritten here, so memory
    holds one weight, not the graph (onnxruntime's quantizer loads it whole: a 7B decoder would need 27 GB). The
    weights keep their precision's scales, so a float16 graph gets float16 scales."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=4)
    quantizer = DefaultWeightOnlyQuantizer(config)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    originals = list(graph.initializer)
    shapes = {t.name: list(t.dims) for t in originals}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2]
    quantized = {n.input[1] for n in matmuls}
    rewritten = {id(n) for n in matmuls}
    still_used = {name for n in graph.node if id(n) not in rewritten for name in n.input}
    del graph.initializer[:]
    with InitializerWriter(model, dst, any(uses_external_data(t) for t in originals)) as writer:
        for tensor in originals:
            array = numpy_helper.to_array(tensor, base_dir=str(src.parent))
            if tensor.name in quantized:
                packed, scales, _ = quantizer.qbits_block_quant(array)
                writer.add(f"{tensor.name}_Q4", packed)
                writer.add(f"{tensor.name}_scales", scales)
            if tensor.name not in quantized or tensor.name in still_used:
                writer.add(tensor.name, array)
    for node in matmuls:
        k, n = shapes[node.input[1]]
        nbits = helper.make_node(
            "MatMulNBits",
            [node.input[0], f"{node.input[1]}_Q4", f"{node.input[1]}_scales"],
            list(node.output),
            name=f"{node.name}_Q4",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=INT4_BLOCK_SIZE,
            accuracy_level=4,
        )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, nbits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return {
        "method": "MatMulNBits (onnxruntime's block quantizer, a weight at a time)",
        "bits": 4,
        "block_size": INT4_BLOCK_SIZE,
        "symmetric": True,
        "accuracy_level": 4,
    }


def _fp16(src: Path, dst: Path) -> dict:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32))
    external = has_external_data(src)
    if external:  # shape inference on a graph with external data works from a path only (in memory it serializes)
        inferred = dst.with_name(f"inferred-{src.name}")
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
        onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
        inferred.unlink()
    else:
        model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=block, disable_shape_infer=external)
    save_graph(model, dst, external)
    return {
        "method": "convert_float_to_float16",
        "weights": "float16",
        "keep_io_types": True,
        "kept_fp32": list(FP16_KEEP_FP32),
    }


def record_traced_fp16(folder: Path) -> None:
    """Describe a folder whose graphs were traced in float16 (a half-precision model) as the fp16 scheme's."""
    path = folder / DESCRIPTION_FILE
    desc = json.loads(path.read_text())
    method = {"method": "traced in float16 (the model's own precision)", "weights": "float16", "keep_io_types": True}
    desc["quantization"] = {"scheme": "fp16", "graphs": dict.fromkeys(desc["graphs"], method)}
    path.write_text(json.dumps(desc, indent=2))


def quantize(folder, scheme: str, out_folder, calibration_inputs: Iterable[Mapping] | None = None) -> OnnxExport:
    """Write `folder`'s graphs quantized with `scheme` (one of ONNX_SCHEMES) into `out_folder`, with the JSON updated.
    `calibration_inputs` (processor outputs of benign images with a prompt) are required for int8_qdq."""
    folder, out = Path(folder), Path(out_folder)
    if scheme not in ONNX_SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(ONNX_SCHEMES)}")
    calibration = list(calibration_inputs or [])
    if scheme == "int8_qdq" and not calibration:
        raise UserError("int8_qdq needs calibration_inputs: processor outputs of a few benign images with a prompt")
    out.mkdir(parents=True, exist_ok=True)
    present = [name for name in GRAPH_FILES if (folder / name).is_file()]
    with tempfile.TemporaryDirectory() as tmp:  # onnxruntime's tools want paths; keep partial files out of `out`
        tmp = Path(tmp)
        done: dict[str, dict] = {}

        def convert(name: str, method, *args) -> None:  # a folder may hold the vision graph alone
            if (folder / name).is_file():
                done[name] = method(folder / name, tmp / name, *args)

        if scheme == "int8_dynamic":
            convert(VISION_FILE, _int8_dynamic, ("MatMul", "Gemm"))
            convert(EMBED_FILE, _int8_dynamic, ("Gather",))
            convert(DECODER_FILE, _int8_dynamic, ("MatMul", "Gemm"))
        elif scheme == "int8_qdq":
            vision_feeds, decoder_feeds = _calibration_feeds(folder, calibration)
            ops = ("MatMul", "Gemm", "Conv")
            convert(VISION_FILE, _int8_qdq, vision_feeds, ops)
            convert(DECODER_FILE, _int8_qdq, decoder_feeds, ops)
        elif scheme == "int4":
            convert(DECODER_FILE, _int4)
        else:
            for name in GRAPH_FILES:
                convert(name, _fp16)
        for name in present:
            for file in graph_files(tmp / name if name in done else folder / name):
                shutil.copyfile(file, out / file.name)
    files = [file.name for name in present for file in graph_files(out / name)]
    if (folder / NEWLINE_FILE).is_file():
        shutil.copyfile(folder / NEWLINE_FILE, out / NEWLINE_FILE)
        files.append(NEWLINE_FILE)
    desc = json.loads((folder / DESCRIPTION_FILE).read_text())
    desc["graphs"] = {name: graph_io(out / name) for name in present}
    before = desc.get("quantization", {}).get("graphs", {})  # a folder traced in float16 says so
    methods = {name: done.get(name, before.get(name, {"method": "none (fp32)"})) for name in present}
    desc["quantization"] = {"scheme": scheme, "graphs": methods}
    (out / DESCRIPTION_FILE).write_text(json.dumps(desc, indent=2))
    files.append(DESCRIPTION_FILE)
    return OnnxExport(out, tuple(files), desc)
