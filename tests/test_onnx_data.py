"""Graphs with external data, as a graph past protobuf's 2 GiB gets them, at tiny scale: the weights go into one
`<graph>_data` file per graph, every quantization scheme keeps that layout, and the folders answer token for token as
the same graphs stored inline (the inline limit lowered to 0 here, so nothing needs 2 GiB to be tested). The
embedding table is outside in both: onnxruntime-genai's embedding graph shares its file."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from test_onnx_export import GEN_EXIT, MAX_NEW_TOKENS, build_inputs, tiny_family
from test_onnx_quantize import CALIBRATION

from edgekit.devices.onnx_runtime import OnnxVLM
from edgekit.export import onnx_data
from edgekit.export.onnx import export_onnx
from edgekit.export.onnx_data import data_file
from edgekit.export.onnx_format import EMBED_FILE, GRAPH_FILES
from edgekit.export.onnx_quantize import quantize
from edgekit.export.quantizations import ONNX_SCHEMES


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    tiny = tiny_family("llava", tiny_checkpoints, tmp_path_factory)
    inline = tiny.folder(GEN_EXIT)
    external = tmp_path_factory.mktemp("external") / "fp32"
    loaded = tiny.loaded
    with mock.patch.object(onnx_data, "INLINE_LIMIT", 0):
        export_onnx(
            loaded.model,
            loaded.processor,
            loaded.family,
            GEN_EXIT,
            external,
            sample_inputs=build_inputs(loaded.processor, 0),
        )
    return tiny, inline, external


def test_weights_in_one_data_file_per_graph(folders):
    tiny, inline, external = folders
    assert sorted(p.name for p in external.iterdir() if p.suffix not in (".json", ".npy")) == sorted(
        [*GRAPH_FILES, *(data_file(external / name).name for name in GRAPH_FILES)]
    )
    inputs = build_inputs(tiny.loaded.processor, 0)
    want = OnnxVLM(inline).generate(inputs, MAX_NEW_TOKENS, eos_token_ids=())
    assert np.array_equal(OnnxVLM(external).generate(inputs, MAX_NEW_TOKENS, eos_token_ids=()), want)


@pytest.mark.parametrize("scheme", ONNX_SCHEMES)
def test_every_scheme_keeps_the_layout_and_the_answers(folders, scheme, tmp_path):
    tiny, inline, external = folders
    calibration = [build_inputs(tiny.loaded.processor, i) for i in CALIBRATION]
    a = quantize(inline, scheme, tmp_path / "inline", calibration_inputs=calibration)
    b = quantize(external, scheme, tmp_path / "external", calibration_inputs=calibration)
    data = [name for name in b.files if name.endswith(".onnx_data")]
    assert data and not [p for p in b.folder.iterdir() if p.suffix == ".data"], b.files
    assert [name for name in a.files if name.endswith(".onnx_data")] == [data_file(inline / EMBED_FILE).name]
    for i in range(2):
        inputs = build_inputs(tiny.loaded.processor, i)
        want = OnnxVLM(a.folder).generate(inputs, MAX_NEW_TOKENS, eos_token_ids=())
        assert np.array_equal(OnnxVLM(b.folder).generate(inputs, MAX_NEW_TOKENS, eos_token_ids=()), want), scheme
