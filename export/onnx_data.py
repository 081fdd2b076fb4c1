"""ONNX graphs with more than 256 MiB of weights keep them in one external data file beside them (protobuf itself stops
at 2 GiB), the layout the ecosystem's large-model exports use (`decoder_model_merged.onnx` +
`decoder_model_merged.onnx_data`), which ONNX Runtime and onnxruntime-genai load as they are.

The exporter traces without the weights; `attach_weights` then writes them from the module a tensor at a time, so
memory stays at the model plus its largest tensor. The quantizers load a graph whole and write it back
with `save_graph`; onnxruntime's own tools name their data file `<graph>.data`, which `relocate` renames.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

ALIGN = 4096  # data offsets page-aligned, so ONNX Runtime can memory-map the file
SMALL_TENSOR = 1024  # bytes: smaller initializers stay inside the graph
# bytes of weights above which a graph keeps them outside: protobuf stops at 2 GiB, and an inline graph is held
# serialized beside the model while it is written and read back, a transient the bounded export avoids
INLINE_LIMIT = 256 * 2**20


def data_file(graph: Path) -> Path:
    return graph.with_name(graph.name + "_data")


def has_external_data(graph: Path) -> bool:
    model = onnx.load(str(graph), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def attach_weights(graph: Path, module: torch.nn.Module, external: bool = False) -> None:
    """Give a graph exported without its weights (`export_params=False`) the module's parameters and buffers, written
    a tensor at a time: inside the graph while the whole stays under INLINE_LIMIT (unless `external`), else into
    `<graph>_data`, so memory never holds a second copy of the model. A weight whose every use is a 2-D Transpose is
    stored transposed instead (the folding the exporter does when it owns the weights), so MatMuls read it directly
    and the quantizers find their weights as initializers."""
    model = onnx.load(str(graph))
    nodes, tensors = model.graph.node, {**dict(module.named_parameters()), **dict(module.named_buffers())}
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            users[name].append(node)
    stored: dict[str, tuple[torch.Tensor, bool]] = {}  # initializer name -> (tensor, transposed)
    folded: list[onnx.NodeProto] = []
    renames: dict[str, str] = {}
    for value in [v for v in model.graph.input if v.name in tensors]:
        model.graph.input.remove(value)
        uses = users[value.name]
        if uses and all(_is_matrix_transpose(n) for n in uses):
            stored[uses[0].output[0]] = (tensors[value.name], True)
            renames |= {n.output[0]: uses[0].output[0] for n in uses[1:]}
            folded += uses
        else:
            stored[value.name] = (tensors[value.name], False)
    for node in folded:
        nodes.remove(node)
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    external = external or sum(t.numel() * t.element_size() for t, _ in stored.values()) > INLINE_LIMIT
    with InitializerWriter(model, graph, external) as writer:
        for name, (tensor, transposed) in stored.items():
            array = tensor.detach().cpu().numpy()
            writer.add(name, array.T if transposed else array)
    onnx.save(model, str(graph))


class InitializerWriter:
    """Adds initializers to `model` one at a time: inside the graph, or (`external`) into `<graph>_data` at
    page-aligned offsets, the bytes written straight to the file (tiny ones stay inside the graph either way)."""

    def __init__(self, model: onnx.ModelProto, graph: Path, external: bool):
        self.model, self.target, self.external = model, data_file(graph), external
        self._out = None

    def __enter__(self) -> InitializerWriter:
        if self.external:
            self._out = open(self.target, "wb")  # noqa: SIM115 (closed in __exit__)
        return self

    def __exit__(self, *exc) -> None:
        if self._out is not None:
            self._out.close()

    def add(self, name: str, array: np.ndarray) -> None:
        if self._out is None or array.nbytes < SMALL_TENSOR:
            self.model.graph.initializer.append(numpy_helper.from_array(array, name))
            return
        out = self._out
        out.write(b"\0" * (-out.tell() % ALIGN))
        offset = out.tell()
        np.ascontiguousarray(array).tofile(out)
        proto = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        proto.dims.extend(array.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        _point(proto, self.target.name, offset, array.nbytes)
        self.model.graph.initializer.append(proto)


def _is_matrix_transpose(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm == [1, 0]


def _point(tensor, location: str, offset: int | None, length: int | None) -> None:
    """Where `tensor`'s bytes are, written into its external_data entries (its data is not loaded, so onnx's own
    set_external_data, which wants the raw bytes at hand, does not apply)."""
    entries = {"location": location, "offset": offset, "length": length}
    del tensor.external_data[:]
    for key, value in entries.items():
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)


def save_graph(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """`model` to `path`, its weights in `<path>_data` when `external` (the source graph had external data)."""
    if external:
        data_file(path).unlink(missing_ok=True)
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file(path).name,
            size_threshold=SMALL_TENSOR,
        )
    else:
        onnx.save(model, str(path))


def relocate(graph: Path, written: Path) -> None:
    """A graph whose external data a tool wrote to `written`: the data renamed to `<graph>_data`."""
    if not written.is_file():
        return
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            _point(tensor, data_file(graph).name, info.offset, info.length)
    written.replace(data_file(graph))
    onnx.save(model, str(graph))


def graph_files(graph: Path) -> list[Path]:
    """The graph and its external data file, where it has one."""
    return [graph, *([data_file(graph)] if data_file(graph).is_file() else [])]
