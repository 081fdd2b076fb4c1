"""ONNX graphs past protobuf's 2 GiB keep their weights in one external data file beside them, the layout the
ecosystem's large-model exports use (`decoder_model_merged.onnx` + `decoder_model_merged.onnx_data`), which ONNX Runtime
and onnxruntime-genai load as they are.

torch's exporter writes a large graph's initializers as one file each; `consolidate` moves them into the single data
file a tensor at a time, so memory stays at the largest tensor. The quantizers load a graph whole and write it back
with `save_graph`; onnxruntime's own tools name their data file `<graph>.data`, which `relocate` renames.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

ALIGN = 4096  # data offsets page-aligned, so ONNX Runtime can memory-map the file
SMALL_TENSOR = 1024  # bytes: smaller initializers stay inside the graph


def data_file(graph: Path) -> Path:
    return graph.with_name(graph.name + "_data")


def has_external_data(graph: Path) -> bool:
    model = onnx.load(str(graph), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def consolidate(graph: Path) -> None:
    """The one-file-per-tensor external data torch writes, moved into `<graph>_data`, tensor by tensor."""
    model = onnx.load(str(graph), load_external_data=False)
    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    if not tensors:
        return
    folder, target = graph.parent, data_file(graph)
    sources = [folder / ExternalDataInfo(t).location for t in tensors]
    with open(target, "wb") as out:
        for tensor, source in zip(tensors, sources):
            info = ExternalDataInfo(tensor)
            with open(source, "rb") as f:
                f.seek(info.offset or 0)
                data = f.read(info.length) if info.length else f.read()
            out.write(b"\0" * (-out.tell() % ALIGN))
            offset = out.tell()
            out.write(data)
            _point(tensor, target.name, offset, len(data))
    onnx.save(model, str(graph))
    for source in set(sources) - {target}:  # the per-tensor files, once the graph points at the new one
        source.unlink(missing_ok=True)


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
