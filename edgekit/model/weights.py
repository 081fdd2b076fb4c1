"""A checkpoint's tensors, read one at a time from its safetensors files, so a writer that walks them holds one
tensor, not the model: llama.cpp's converter works the same way on a 14 GB download.

`CheckpointTensors` is the lazy view of a folder; `ModelTensors` gives an in-memory state dict the same interface
(`shape`, `dtype`, item access), so writers take either. `language_model_tensors` picks the language model's
tensors out of a VLM checkpoint under the HF Llama names (`model.layers.N.*`, `model.embed_tokens`, `model.norm`,
`lm_head`), whichever layout the checkpoint was saved in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from edgekit.model.loading import SAFETENSORS_INDEX, check_weight_files

# Where a VLM checkpoint keeps its language model: the hub's layout (transformers 4: `language_model.model.*`,
# `language_model.lm_head`) and the one transformers 5 saves (`model.language_model.*`, `lm_head`).
_LM_BODY = re.compile(r"^(?:language_model\.model|model\.language_model|language_model)\.(.+)$")
_LM_HEAD = re.compile(r"^(?:language_model\.)?lm_head\.(.+)$")


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """Checkpoint name -> tensor, read from its safetensors file on access (the file is closed again, so no
    mapping of the whole shard stays resident). Shapes and dtypes come from the headers without reading data."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        check_weight_files(self.folder)
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            self._file = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self._file = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(path, "pt") as f:
                    self._file |= dict.fromkeys(f.keys(), path)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in sorted(set(self._file.values())):
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            self._meta |= {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._file[name], "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._meta[name][1]]


class ModelTensors(Mapping[str, torch.Tensor]):
    """An in-memory state dict behind CheckpointTensors' interface."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._state = state

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype


class Renamed(Mapping[str, torch.Tensor]):
    """`tensors` seen under new names: {new name: old name}."""

    def __init__(self, tensors, names: dict[str, str]):
        self._tensors, self._names = tensors, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[self._names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors.shape(self._names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors.dtype(self._names[name])


def language_model_tensors(tensors) -> Renamed:
    """The language model's tensors of a VLM checkpoint under HF Llama names; the rest (tower, projector) left out."""
    names = {}
    for key in tensors:
        if head := _LM_HEAD.match(key):
            names[f"lm_head.{head[1]}"] = key
        elif body := _LM_BODY.match(key):
            names[f"model.{body[1]}"] = key
    if not any(n.startswith("model.layers.") for n in names):
        raise ValueError(
            "no language-model layers in this checkpoint (expected language_model.* or model.language_model.*)"
        )
    return Renamed(tensors, names)


def checkpoint_dtype(tensors) -> torch.dtype:
    """The floating dtype most of the checkpoint's bytes are in (what it was saved as)."""
    totals: dict[torch.dtype, int] = {}
    for name in tensors:
        dtype = tensors.dtype(name)
        if dtype.is_floating_point:
            count = 1
            for n in tensors.shape(name):
                count *= n
            totals[dtype] = totals.get(dtype, 0) + count
    return max(totals, key=totals.get)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
